"""Scheduler side of the block cache: admission of block prompts and non-prefix reuse.

``BlockAttnScheduler.add_request`` turns a block prompt into what the engine stores:

1. every page of every non-final block is keyed by the block's own tokens (``cache_keys.py`` holds the
   keys and the argument that a key determines the page's KV), so the same document hits at any
   offset, in any order, in any prompt; the head's full pages keep vLLM's own prefix hashes and are
   shared with plain prompts;
2. blocks are padded to whole KV pages (``core/paged.py``), and a sink-free layout's boundary tokens are
   dropped (they mark blocks and never reach the model or the KV cache); blocks whose pages are all cached move to
   the front, followed by the block with the longest run of cached leading pages: vLLM's lookup only
   accepts a leading run of hits (``num_computed_tokens`` is one count), and non-final blocks are
   order-independent;
3. the physical layout (with each block's logical offset) stays on the scheduler's own ``Request``
   object and travels to the workers as an attribute of vLLM's ``SchedulerOutput``, for the requests
   they have not seen yet. Nothing a client sends can reach it (see docs/plugin.md, "Trust and
   correctness").

Outputs never show any of this: the frontend keeps the user's prompt, and results equal the unpadded
reference. If preparing a request fails for any reason, that request alone finishes with an error
(``finish_reason="error"``); the engine keeps serving.
"""

from __future__ import annotations

import logging
import math

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.utils.hashing import get_hash_fn_by_name

from ..core.config import get_block_config
from ..core.paged import SCHEDULER_OUTPUT_ATTR, pad_and_order
from .cache_keys import block_chain, leading_hits, make_hasher, namespace_keys, request_namespace
from .metrics import record, set_pinned_pages
from .pins import PinError, PinTable

logger = logging.getLogger("vllm.blockattn")  # under vLLM's logger: its handler and level

# Attribute of the scheduler's own ``Request`` objects holding the request's PagedLayout.
_REQUEST_ATTR = "_blockattn_paged_layout"


class BlockAttnSchedulerMixin:
    """Block-prompt preparation on top of a vLLM scheduler; ordinary prompts pass through untouched."""

    _blockattn_scheduler = True  # marks the plugin's schedulers and their subclasses (support.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._block_config = get_block_config(self.vllm_config)
        if self.hash_block_size != self.block_size:
            raise ValueError("blockattn needs one KV page size for hashing and allocation "
                             f"(got hash_block_size={self.hash_block_size}, block_size={self.block_size})")
        self._caching = self.cache_config.enable_prefix_caching
        self._hash_fn = get_hash_fn_by_name(self.cache_config.prefix_caching_hash_algo) if self._caching else None
        self._group_ids = list(range(len(self.kv_cache_config.kv_cache_groups)))
        # Requests whose preparation failed: answered with finish_reason "error" at the next output.
        self._blockattn_failed: list[tuple[object, str]] = []
        # Block cache statistics, for the offline API and tests.
        self.blockattn_stats = {"requests": 0, "blocks": 0, "block_hits": 0, "reused_tokens": 0,
                                "pinned_block_hits": 0}
        pool = self.kv_cache_manager.block_pool
        pinnable = int(self._block_config.pin_fraction * pool.num_gpu_blocks)
        self._blockattn_pins = PinTable(pinnable, int(self._block_config.pin_tenant_fraction * pinnable))

    # -- admission -----------------------------------------------------------------------------------

    def add_request(self, request) -> None:
        if request.request_id in self.requests:  # a streaming-input continuation
            if request.resumable:
                self._fail(request, "streaming-input sessions are not supported by the blockattn backend")
                return
            super().add_request(request)
            return
        try:
            if request.resumable:
                raise ValueError("streaming-input sessions are not supported by the blockattn backend")
            self._prepare_block_request(request)
        except Exception as e:  # noqa: BLE001 - any failure here must stay with this one request
            logger.warning("blockattn: request %s rejected: %s", request.request_id, e)
            self._fail(request, str(e))
            return
        super().add_request(request)

    def _fail(self, request, reason: str) -> None:
        self._blockattn_failed.append((request, reason))

    def has_requests(self) -> bool:
        return bool(self._blockattn_failed) or super().has_requests()

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        failed, self._blockattn_failed = self._blockattn_failed, []
        for request, _ in failed:
            out = EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                   finish_reason=FinishReason.ERROR)
            eco = outputs.get(request.client_index)
            if eco is None:
                outputs[request.client_index] = EngineCoreOutputs(outputs=[out])
            else:
                eco.outputs.append(out)
        return outputs

    def schedule(self, *args, **kwargs):
        pins = self._blockattn_pins
        if len(pins) and pins.expire(self.kv_cache_manager.block_pool):
            set_pinned_pages(pins.pinned_pages)
        out = super().schedule(*args, **kwargs)
        ids = [r.req_id for r in out.scheduled_new_reqs]
        ids.extend(getattr(out.scheduled_cached_reqs, "resumed_req_ids", None) or ())
        layouts = {}
        for rid in ids:
            request = self.requests.get(rid)
            paged = getattr(request, _REQUEST_ATTR, None)
            if paged is not None:
                layouts[rid] = paged
                _report_real_tokens(request, paged)
        setattr(out, SCHEDULER_OUTPUT_ATTR, layouts)
        return out

    # -- block prompts -------------------------------------------------------------------------------

    def _prepare_block_request(self, request) -> None:
        cfg = self._block_config
        if request.prompt_token_ids is None or request.sampling_params is None \
                or getattr(request, "prompt_embeds", None) is not None:
            return  # prompt embeddings and pooling requests carry no block layout
        layout = cfg.check_prompt(request.prompt_token_ids)  # raises on a malformed or oversized prompt
        if not layout.is_block_prompt:
            if layout.has_markers_removed:  # sink-free `B question`: an ordinary prompt without its boundary
                ids = list(request.prompt_token_ids)
                _rebind(request, [ids[i] for i in layout.real_token_indices()])
                request.block_hashes.clear()
                request.update_block_hashes()
            return
        if request.mm_features:
            raise ValueError("multimodal inputs in a block prompt are not supported by the blockattn backend")
        page = self.block_size
        ids = list(request.prompt_token_ids)
        keys = request_namespace(cfg.namespace, request)

        block_hashes: list[list] = []
        if self._caching:
            # vLLM's own page hashes of the user's prompt, computed on arrival: the head's full pages.
            plain_chain = list(request.block_hashes)
            for blk in layout.context_blocks:
                is_head = blk.start == 0 and blk.content_start == 0  # tokens before the first sink group
                block_hashes.append(block_chain(self._hash_fn, page, cfg.pad_id, ids[blk.start : blk.end], keys,
                                                plain_chain if is_head else None))

        # Leading cached pages of each block: whole blocks move to the front, then the block that has
        # the longest cached run (a grown block, a head that a plain prompt computed); vLLM's lookup
        # stops at the first miss, so the other blocks' cached leading pages cannot be used.
        pool = self.kv_cache_manager.block_pool
        hit_pages = [leading_hits(pool, chain, self._group_ids) for chain in block_hashes]
        cached = [n == len(chain) for n, chain in zip(hit_pages, block_hashes)] \
            or [False] * len(layout.context_blocks)
        partial = max((b for b, hit in enumerate(cached) if not hit and hit_pages[b]),
                      key=lambda b: hit_pages[b], default=None)  # max keeps the first of ties
        new_ids, paged = pad_and_order(ids, layout, page, cfg.pad_id, cached.__getitem__, next_block=partial)
        paged.validate(len(new_ids), page)
        hasher = make_hasher(self._hash_fn, page, keys, layout, block_hashes, paged) if self._caching else None

        # Nothing above touched the request; from here on nothing can fail.
        hits = [b for b, hit in enumerate(cached) if hit]
        reused = sum(layout.context_blocks[b].num_tokens for b in hits)
        if partial is not None:  # full pages of the partly cached block: real tokens only
            reused += hit_pages[partial] * page
        pinned_hits = sum(1 for b in hits if self._blockattn_pins.is_pinned(block_hashes[b][-1]))
        record(self.blockattn_stats, requests=1, blocks=len(layout.context_blocks), block_hits=len(hits),
               reused_tokens=reused, pinned_block_hits=pinned_hits)
        _rebind(request, new_ids)
        setattr(request, _REQUEST_ATTR, paged)
        request.block_hashes.clear()
        if hasher is not None:
            request._block_hasher = hasher
        # Without prefix caching vLLM's own hasher (if any) stays: no page is ever looked up by it.
        request.update_block_hashes()

    # -- pins (engine/pins.py; reached only through the engine core's blockattn_pins utility) ------------

    def blockattn_pins(self, op: str, cache_salt: str | None, lora, blocks: list, ttl: float | None) -> dict:
        """Pin (``op="pin"``) or unpin the context blocks ``blocks`` (token ids without sinks) of the
        tenant ``cache_salt`` and adapter ``lora`` ((name, path) or None). Returns counts, or
        ``{"error": ...}`` for a refusal (nothing changed)."""
        if op not in ("pin", "unpin"):
            return {"error": f"unknown pin operation {op!r}"}
        if not self._caching:
            return {"error": "pinning needs the block cache: the server runs without prefix caching"}
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                                or not math.isfinite(ttl) or ttl <= 0):
            return {"error": f"ttl_seconds must be a positive number, got {ttl!r}"}
        cfg = self._block_config
        keys = namespace_keys(cfg.namespace, cache_salt, None if lora is None else tuple(lora))
        sinks = cfg.settings.sinks  # a block's attended span: its sinks (none sink-free) and its content
        chains = [block_chain(self._hash_fn, self.block_size, cfg.pad_id, sinks + list(b), keys) for b in blocks]
        pool, pins = self.kv_cache_manager.block_pool, self._blockattn_pins
        try:
            result = pins.pin(pool, self._group_ids, chains, ttl, tenant=cache_salt) if op == "pin" \
                else pins.unpin(pool, chains)
        except PinError as e:
            return {"error": str(e)}
        set_pinned_pages(pins.pinned_pages)
        return result


class BlockAttnScheduler(BlockAttnSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler with block-prompt preparation."""


class BlockAttnAsyncScheduler(BlockAttnSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler with block-prompt preparation."""


def _rebind(request, new_ids: list[int]) -> None:
    """Give ``request`` the physical prompt the engine computes (padded, reordered, without sink-free
    boundary tokens); the frontend keeps the user's prompt."""
    request.prompt_token_ids = new_ids
    request._all_token_ids[:] = new_ids  # `all_token_ids` is a read-only view of this list
    request.num_prompt_tokens = len(new_ids)


def _report_real_tokens(request, paged) -> None:
    """Restate the request's first-prefill statistics in real tokens: vLLM counts KV slots, pads
    included, and the user's prompt has no pads. ``usage.prompt_tokens_details.cached_tokens`` then
    counts the prompt tokens served from the block cache and the prefix cache, next to
    ``usage.prompt_tokens`` of the same (unpadded) prompt."""
    stats = getattr(request, "prefill_stats", None)
    if stats is None or getattr(stats, "_blockattn_real", False) or not stats.num_prompt_tokens:
        return
    total = paged.real_tokens_before(request.num_prompt_tokens)
    cached = paged.real_tokens_before(stats.num_cached_tokens)
    local = paged.real_tokens_before(stats.num_local_cached_tokens)
    stats.num_prompt_tokens, stats.num_cached_tokens = total, cached
    stats.num_local_cached_tokens, stats.num_external_cached_tokens = local, cached - local
    stats.num_computed_tokens = total - cached
    stats._blockattn_real = True
    finalize = type(stats).finalize  # called later with a slot count (the KV written for the prompt)
    stats.finalize = lambda num_cached_slots: finalize(stats, paged.real_tokens_before(num_cached_slots))
