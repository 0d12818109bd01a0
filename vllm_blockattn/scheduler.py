"""Scheduler side of the block cache: prefix-independent page hashes and non-prefix reuse.

``BlockAttnScheduler.add_request`` turns a block prompt into what the engine stores:

1. every non-final block is padded to whole KV pages, and its pages are hashed by the block's own
   tokens alone: the first page of each block starts a new hash chain (no parent) under a namespace
   (model, sink settings, "blockattn", the request's ``cache_salt``), so the same document hits at any
   offset, in any order, in any prompt, and never meets full-attention KV (whose chains carry no
   namespace) or another tenant's blocks;
2. blocks whose pages are all cached move to the front: vLLM's lookup only accepts a leading run of
   hits (``num_computed_tokens`` is one count), and non-final blocks are order-independent;
3. the final block's chain starts from a hash of the *logical* sequence of (block hash, offset), since
   its KV depends on every block and where each one logically sits;
4. the physical layout (with each block's logical offset) travels to the worker in
   ``sampling_params.extra_args``; the worker only ever sees the padded, permuted ids.

Outputs never show any of this: the frontend keeps the user's prompt, and results equal the unpadded
reference.
"""

from __future__ import annotations

import copy

from vllm.v1.core.kv_cache_utils import hash_block_tokens
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.utils.hashing import get_hash_fn_by_name

from .config import get_block_config
from .layout import BlockLayoutError
from .metrics import record
from .paged import EXTRA_ARGS_KEY, pad_and_order


class BlockAttnSchedulerMixin:
    """Block-prompt preparation on top of a vLLM scheduler; ordinary prompts pass through untouched."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._block_config = get_block_config(self.vllm_config)
        if self.hash_block_size != self.block_size:
            raise ValueError("blockattn needs one KV page size for hashing and allocation "
                             f"(got hash_block_size={self.hash_block_size}, block_size={self.block_size})")
        self._caching = self.cache_config.enable_prefix_caching
        self._hash_fn = get_hash_fn_by_name(self.cache_config.prefix_caching_hash_algo) if self._caching else None
        self._group_ids = list(range(len(self.kv_cache_config.kv_cache_groups)))
        # Block cache statistics, for the offline API and tests.
        self.blockattn_stats = {"requests": 0, "blocks": 0, "block_hits": 0, "reused_tokens": 0}

    def add_request(self, request) -> None:
        if request.request_id not in self.requests and request.prompt_token_ids is not None \
                and request.sampling_params is not None:
            self._prepare_block_request(request)
        super().add_request(request)

    def _prepare_block_request(self, request) -> None:
        cfg = self._block_config
        try:
            layout = cfg.parse(request.prompt_token_ids)
        except BlockLayoutError:
            return  # the frontend already rejected malformed prompts; anything else runs stock
        if not layout.is_block_prompt:
            return
        page = self.block_size
        ids = list(request.prompt_token_ids)
        keys = cfg.namespace + ((("cache_salt", request.cache_salt),) if request.cache_salt else ())
        lora = request.lora_request
        if lora is not None:  # KV computed under one adapter must never serve another
            keys += (("lora", lora.lora_name, lora.lora_path),)
        # Multimodal placeholders' KV depends on more than their token ids: no block cache for them.
        caching = self._caching and not request.mm_features

        block_hashes: list[list] = []
        if caching:
            for blk in layout.context_blocks:
                toks = ids[blk.start : blk.end] + [cfg.pad_id] * (-blk.num_tokens % page)
                chain, parent = [], None
                for p in range(0, len(toks), page):
                    parent = hash_block_tokens(self._hash_fn, parent, toks[p : p + page], keys)
                    chain.append(parent)
                block_hashes.append(chain)

        pool = self.kv_cache_manager.block_pool
        cached = [all(pool.get_cached_block(h, self._group_ids) is not None for h in chain)
                  for chain in block_hashes] or [False] * len(layout.context_blocks)
        new_ids, paged = pad_and_order(ids, layout, page, cfg.pad_id, cached.__getitem__)
        hits = [b for b, hit in enumerate(cached) if hit]
        record(self.blockattn_stats, requests=1, blocks=len(layout.context_blocks), block_hits=len(hits),
               reused_tokens=sum(layout.context_blocks[b].num_tokens for b in hits))

        request.prompt_token_ids = new_ids
        request._all_token_ids[:] = new_ids  # `all_token_ids` is a read-only view of this list
        request.num_prompt_tokens = len(new_ids)
        params = copy.copy(request.sampling_params)
        params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: paged.encode()}
        request.sampling_params = params
        request.block_hashes.clear()
        if caching:
            request._block_hasher = _make_hasher(self._hash_fn, page, keys, layout, block_hashes, paged)
        # Otherwise vLLM's own prefix-chained hasher stays: exact for the same physical prompt, and
        # nothing was reordered.
        request.update_block_hashes()


class BlockAttnScheduler(BlockAttnSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler with block-prompt preparation."""


class BlockAttnAsyncScheduler(BlockAttnSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler with block-prompt preparation."""


def _make_hasher(hash_fn, page, keys, layout, block_hashes, paged):
    """The request's block hasher: precomputed per-block chains for the context pages, then a chain
    over the final block (and generated tokens) rooted at the logical block sequence."""
    offsets = layout.offsets()
    logical_of = {o: b for b, o in enumerate(offsets[:-1])}  # offsets are distinct: blocks are non-empty
    context_pages = [h for o in paged.offsets for h in block_hashes[logical_of[o]]]  # physical order
    logical_chain = [bh[-1] for bh in block_hashes]
    root = hash_block_tokens(hash_fn, None, (), keys + (("blocks", tuple(zip(logical_chain, offsets[:-1]))),))
    n_ctx = len(context_pages)

    def hasher(request) -> list:
        have = len(request.block_hashes)
        out: list = []
        for p in range(have, request.num_tokens // page):
            if p < n_ctx:
                out.append(context_pages[p])
                continue
            prev = root if p == n_ctx else (out[-1] if out else request.block_hashes[p - 1])
            out.append(hash_block_tokens(hash_fn, prev, request.all_token_ids[p * page : (p + 1) * page], keys))
        return out

    return hasher
