"""From a user's block prompt to what the engine stores: page-aligned, reordered, with logical offsets.

The scheduler pads every non-final block to whole KV pages (so that each page belongs to one block and
can be hashed by that block's tokens alone) and may move cached blocks to the front (vLLM only reuses
a leading run of cached pages). Non-final blocks are order-independent under block attention, so the
physical order changes nothing as long as every block keeps its *logical* offset: the position it has
in the user's unpadded prompt. :class:`PagedLayout` carries that mapping from the scheduler to the
worker (attached to vLLM's ``SchedulerOutput``, where no client can write; see ``scheduler.py``)::

    physical slots:  | blk A (+pads) | blk B (+pads) | final block ... generated tokens
    logical offsets:   o_A             o_B             final_offset = sum of real block lengths

Non-final tokens get block-local positions (first sink at 0), so their cached keys are canonical;
final-block tokens get global logical positions; a final query reads block b's keys rotated by o_b.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .layout import BlockLayout, page_padding

# Attribute of vLLM's ``SchedulerOutput`` that carries {request id: PagedLayout} for the block requests
# the worker has not seen yet (new or resumed). Requests never carry a layout themselves.
SCHEDULER_OUTPUT_ATTR = "blockattn_layouts"
# ``extra_args`` keys with this prefix are reserved: the frontend rejects them on every request.
RESERVED_PREFIX = "_blockattn"


@dataclass(frozen=True)
class PagedLayout:
    """Physical placement of a block request's non-final blocks and their logical offsets."""

    starts: tuple[int, ...]  # first slot of each non-final block (physical order)
    ends: tuple[int, ...]  # one past its last real token
    padded_ends: tuple[int, ...]  # one past its pads (a page boundary)
    offsets: tuple[int, ...]  # logical offset of each block in the user's prompt
    final_start: int  # first slot of the final block
    final_offset: int  # logical position of the final block's first token

    @property
    def num_blocks(self) -> int:
        return len(self.starts)

    def validate(self, num_prompt_tokens: int, page_size: int) -> None:
        """Check the invariants every consumer relies on; raises ValueError naming the broken one.

        Blocks tile ``[0, final_start)`` in order, each starting on a page boundary with at least one
        real token, pads only at its end (fewer than a page); the final block is non-empty; logical
        offsets are distinct, and each block's logical span lies before the final offset.
        """
        n = self.num_blocks
        if not (len(self.ends) == len(self.padded_ends) == len(self.offsets) == n):
            raise ValueError("paged layout: ragged block fields")
        slot = 0
        for b in range(n):
            s, e, pe, o = self.starts[b], self.ends[b], self.padded_ends[b], self.offsets[b]
            if s != slot or s % page_size or not s < e <= pe or pe % page_size or pe - e >= page_size:
                raise ValueError(f"paged layout: block {b} spans [{s}, {e}) padded to {pe}, "
                                 f"expected to start at {slot} on a page of {page_size}")
            if not 0 <= o or o + (e - s) > self.final_offset:
                raise ValueError(f"paged layout: block {b} has logical offset {o} beyond the final block")
            slot = pe
        if self.final_start != slot or not self.final_start < num_prompt_tokens:
            raise ValueError(f"paged layout: final block starts at {self.final_start}, expected {slot} "
                             f"before the prompt's end ({num_prompt_tokens})")
        if len(set(self.offsets)) != n or sum(e - s for s, e in zip(self.starts, self.ends)) != self.final_offset:
            raise ValueError("paged layout: logical offsets do not tile the context blocks")

    def positions(self, slots: np.ndarray) -> np.ndarray:
        """Positions for the tokens at ``slots``: block-local in non-final blocks, logical in the final
        block (and for every generated token). Pad slots get a harmless local position."""
        slots = np.asarray(slots, dtype=np.int64)
        out = slots - self.final_start + self.final_offset
        if self.num_blocks:
            starts = np.asarray(self.starts, dtype=np.int64)
            ctx = slots < self.final_start
            blk = np.searchsorted(starts, slots[ctx], side="right") - 1
            out[ctx] = slots[ctx] - starts[blk]
        return out

    def real_tokens_before(self, slot: int) -> int:
        """Real (non-pad) prompt tokens in the physical slots ``[0, slot)``: what a count of cached or
        computed slots means to a user, whose prompt has no pads."""
        real = 0
        for s, e in zip(self.starts, self.ends):
            if slot <= s:
                return real
            real += min(slot, e) - s
        return real + max(0, slot - self.final_start)

    def block_of_slot(self, slot: int) -> int:
        """Index of the physical block holding ``slot``; ``num_blocks`` for the final block."""
        if slot >= self.final_start:
            return self.num_blocks
        return int(np.searchsorted(np.asarray(self.starts), slot, side="right") - 1)


def pad_and_order(token_ids: Sequence[int], layout: BlockLayout, page_size: int, pad_id: int,
                  is_cached: Callable[[int], bool] | None = None, next_block: int | None = None,
                  ) -> tuple[list[int], PagedLayout]:
    """Pad non-final blocks to pages and put cached ones first, then ``next_block`` (stable otherwise).

    Args:
        token_ids: the user's prompt (unpadded), laid out per ``layout``.
        layout: its parsed layout (must be a block prompt).
        page_size: the KV cache block size.
        pad_id: id written into pad slots (never attended).
        is_cached: whether context block ``b`` (index into ``layout.context_blocks``) is fully cached.
        next_block: a context block to place right after the cached ones (the scheduler's block whose
            leading pages are cached: vLLM reuses a leading run of pages, so they extend that run).

    Returns:
        The physical token ids and their :class:`PagedLayout`.
    """
    ids = list(token_ids)
    ctx = layout.context_blocks
    offsets = layout.offsets()
    hits = [is_cached is not None and bool(is_cached(b)) for b in range(len(ctx))]
    rest = [b for b in range(len(ctx)) if not hits[b]]
    if next_block in rest:
        rest.remove(next_block)
        rest.insert(0, next_block)
    order = [b for b in range(len(ctx)) if hits[b]] + rest
    out: list[int] = []
    starts, ends, pends, offs = [], [], [], []
    for b in order:
        blk = ctx[b]
        starts.append(len(out))
        out.extend(ids[blk.start : blk.end])
        ends.append(len(out))
        out.extend([pad_id] * page_padding(blk.num_tokens, page_size))
        pends.append(len(out))
        offs.append(offsets[b])
    final_start = len(out)
    out.extend(ids[layout.final.start : layout.final.end])
    return out, PagedLayout(tuple(starts), tuple(ends), tuple(pends), tuple(offs), final_start, offsets[-1])


def padded_length(layout: BlockLayout, page_size: int) -> int:
    """Length of the prompt once its non-final blocks are padded to pages."""
    return sum(b.num_tokens + page_padding(b.num_tokens, page_size) for b in layout.context_blocks) \
        + layout.final.num_tokens
