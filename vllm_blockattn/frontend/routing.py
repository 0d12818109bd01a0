"""Block-affinity routing for data parallelism: send a block request to the engine that holds its
documents.

With ``--data-parallel-size N`` every engine core has its own block cache, and vLLM's balancer picks
the least-loaded engine, so a document would warm in every engine separately. A context block's KV
depends on its own tokens alone (and on the tenant: ``cache_salt``, adapter), so *where a block
should be* can be a property of the block itself: every block has a home engine, chosen by
rendezvous hashing (the engine with the highest hash of (block, engine)), and a request goes to the
engine that is home to most of its block tokens. Later requests carrying the same documents, in any
order, behind any prefix, go to the same engine and find them there.

Why a hash and not an index of what was routed: vLLM runs one API server per data-parallel rank by
default (``--api-server-count``), each with its own engine client, so an index kept by one API
server would not know what the others sent where. A stable hash (blake2b of the tenant and the
block's tokens, not Python's per-process ``hash``) gives every API server, and every restart, the same
answer with no shared state. Blocks spread evenly over engines, like keys over a consistent hash.

Load comes first: when the home engine is busier than the least-loaded one by more than
``imbalance`` requests, vLLM's own choice stands. Requests without blocks, and requests a client
pinned to a rank (``X-data-parallel-rank``), are vLLM's as before.
``additional_config["blockattn"]["dp_routing"]``: ``"blocks"`` (default) or ``"off"`` (vLLM's
balancing only).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from ..core.layout import BlockLayoutError, BlockSettings, parse_block_prompt


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


class BlockRouter:
    def __init__(self, settings: BlockSettings, *, imbalance: float = 4.0):
        self.settings, self.imbalance = settings, imbalance
        self.routed = self.fallbacks = 0  # requests sent home / left to vLLM because home was too busy

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

    def choose(self, blocks: list[tuple[bytes, int]], loads: Sequence[float]) -> int | None:
        """The engine that is home to most of ``blocks`` (by tokens), or None to leave the choice to
        vLLM (no blocks, or that engine too busy)."""
        if not blocks or len(loads) < 2:
            return None
        tokens = [0] * len(loads)
        for key, n in blocks:
            tokens[self.home(key, len(loads))] += n
        best = max(range(len(loads)), key=lambda e: (tokens[e], -loads[e]))
        if loads[best] - min(loads) > self.imbalance:
            self.fallbacks += 1
            return None
        self.routed += 1
        return best
