"""Block-affinity routing for data parallelism: send a block request to the engine that holds its
documents.

With ``--data-parallel-size N`` every engine core has its own block cache, and vLLM's balancer picks
the least-loaded engine, so a document would warm in every engine separately. A context block's KV
depends on its own tokens alone (and on the tenant: ``cache_salt``, adapter), so *where a block
should be* can be a property of the block itself: every block has a home engine, chosen by
rendezvous hashing (the engine with the highest hash of (block, engine)). Each API server also
remembers where it sent every block (a bounded index). A request goes to the engine that holds most
of its block tokens, counting a block where the index has seen it and, when the index has not, at
its home. Later requests carrying the same documents, in any order, behind any prefix, go to the
same engine and find them there; a document that was computed away from its home (because most of
its request lived elsewhere) is found there too.

Why the hash: vLLM runs one API server per data-parallel rank by default (``--api-server-count``),
each with its own engine client, so an index kept by one API server does not know what the others
sent where. A stable hash (blake2b of the tenant and the block's tokens, not Python's per-process
``hash``) gives every API server, and every restart, the same answer for a block none of them has
seen placed. Blocks spread evenly over engines, like keys over a consistent hash.

Cache affinity is weighed against load, in tokens of prefill work: an engine's cost for the request
is the block tokens it would have to compute (those it does not hold) plus, for every request it
already has in flight, the mean prompt length of the requests routed so far; the request goes to the
cheapest engine. (A first version sent a request to its blocks' engine unless that engine had 4 more
requests in flight than the least loaded one; on the DP=2 RAG replay it put 114 of 128 requests on
one engine: affinity alone concentrates popular documents, and a bound in requests never triggered
at concurrency 4.) Requests without blocks, and requests a client pinned to a rank
(``X-data-parallel-rank``), are vLLM's as before.
``additional_config["blockattn"]["dp_routing"]``: ``"blocks"`` (default) or ``"off"`` (vLLM's
balancing only).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from ..core.layout import BlockLayoutError, BlockSettings, parse_block_prompt


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


class BlockRouter:
    def __init__(self, settings: BlockSettings, *, max_entries: int = 1 << 17):
        self.settings, self.max_entries = settings, max_entries
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # block key -> bit set of engines sent to
        self._prompt_tokens = self._requests = 0  # for the mean prompt length (the cost of one queued request)
        self.by_affinity = 0  # requests sent to an engine that was not the least loaded

    def blocks(self, request) -> list[tuple[bytes, int]]:
        """(key, tokens) of the request's context blocks; empty for an ordinary request. The key is a
        stable digest of the tenant (``cache_salt``, adapter) and the block's tokens."""
        ids = getattr(request, "prompt_token_ids", None)
        if not ids:
            return []
        try:
            layout = parse_block_prompt(ids, self.settings)
        except BlockLayoutError:
            return []  # the input processor refuses it; nothing to route
        if not layout.is_block_prompt:
            return []
        lora = getattr(request, "lora_request", None)
        tenant = repr((getattr(request, "cache_salt", None), None if lora is None else lora.lora_name)).encode()
        out = []
        for b in layout.context_blocks:
            tokens = array("q", ids[b.start:b.end]).tobytes()
            out.append((_digest(tenant + b"\0" + tokens), b.num_tokens))
        return out

    @staticmethod
    def home(key: bytes, num_engines: int) -> int:
        """The block's engine: rendezvous hashing, stable across processes and restarts."""
        return max(range(num_engines), key=lambda e: _digest(key + e.to_bytes(4, "little")))

    def choose(self, blocks: list[tuple[bytes, int]], loads: Sequence[float], prompt_tokens: int = 0) -> int | None:
        """The engine with the least prefill work for this request: the block tokens it does not hold
        (by where this API server sent them, else by their home) plus its in-flight requests at the
        mean prompt length. None (vLLM's choice) for a request without blocks."""
        if not blocks or len(loads) < 2:
            return None
        self._requests += 1
        self._prompt_tokens += prompt_tokens or sum(n for _, n in blocks)
        per_request = self._prompt_tokens / self._requests
        held = [0] * len(loads)
        for key, n in blocks:
            engines = self._seen.get(key, 0)
            for e in [e for e in range(len(loads)) if engines >> e & 1] or [self.home(key, len(loads))]:
                held[e] += n
        total = sum(n for _, n in blocks)
        cost = [total - held[e] + loads[e] * per_request for e in range(len(loads))]
        best = min(range(len(loads)), key=lambda e: (cost[e], -held[e], loads[e]))
        if loads[best] > min(loads):
            self.by_affinity += 1
        return best

    def record(self, blocks: list[tuple[bytes, int]], engine: int) -> None:
        """The request went to ``engine``: its blocks are (or will be) cached there."""
        for key, _ in blocks:
            self._seen[key] = self._seen.get(key, 0) | (1 << engine)
            self._seen.move_to_end(key)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
