"""From a user's block prompt to what the engine stores: page-aligned, reordered, with logical offsets.

The scheduler pads every non-final block to whole KV pages (so that each page belongs to one block and
can be hashed by that block's tokens alone) and may move cached blocks to the front (vLLM only reuses
a leading run of cached pages). Non-final blocks are order-independent under block attention, so the
physical order changes nothing as long as every block keeps its *logical* offset: the position it has
in the user's unpadded prompt. :class:`PagedLayout` carries that mapping from the scheduler to the
worker (inside ``sampling_params.extra_args``)::

    physical slots:  | blk A (+pads) | blk B (+pads) | final block ... generated tokens
    logical offsets:   o_A             o_B             final_offset = sum of real block lengths

Non-final tokens get block-local positions (first sink at 0), so their cached keys are canonical;
final-block tokens get global logical positions; a final query reads block b's keys rotated by o_b.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .layout import BlockLayout

EXTRA_ARGS_KEY = "_blockattn_layout"


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

    def encode(self) -> list[int]:
        """Flat ints, so the layout travels in ``extra_args`` (msgpack/JSON safe)."""
        flat = [self.num_blocks, self.final_start, self.final_offset]
        for row in zip(self.starts, self.ends, self.padded_ends, self.offsets):
            flat.extend(row)
        return flat

    @classmethod
    def decode(cls, flat: Sequence[int]) -> PagedLayout:
        n, final_start, final_offset = (int(x) for x in flat[:3])
        rows = np.asarray(flat[3:], dtype=np.int64).reshape(n, 4) if n else np.zeros((0, 4), np.int64)
        return cls(*(tuple(int(v) for v in rows[:, c]) for c in range(4)), final_start, final_offset)

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

    def block_of_slot(self, slot: int) -> int:
        """Index of the physical block holding ``slot``; ``num_blocks`` for the final block."""
        if slot >= self.final_start:
            return self.num_blocks
        return int(np.searchsorted(np.asarray(self.starts), slot, side="right") - 1)


def pad_and_order(token_ids: Sequence[int], layout: BlockLayout, page_size: int, pad_id: int,
                  is_cached: Callable[[int], bool] | None = None) -> tuple[list[int], PagedLayout]:
    """Pad non-final blocks to pages and put cached ones first (stable otherwise).

    Args:
        token_ids: the user's prompt (unpadded), laid out per ``layout``.
        layout: its parsed layout (must be a block prompt).
        page_size: the KV cache block size.
        pad_id: id written into pad slots (never attended).
        is_cached: whether context block ``b`` (index into ``layout.context_blocks``) is fully cached.

    Returns:
        The physical token ids and their :class:`PagedLayout`.
    """
    ids = list(token_ids)
    ctx = layout.context_blocks
    offsets = layout.offsets()
    order = list(range(len(ctx)))
    if is_cached is not None:
        hits = [bool(is_cached(b)) for b in order]
        order = [b for b in order if hits[b]] + [b for b in order if not hits[b]]
    out: list[int] = []
    starts, ends, pends, offs = [], [], [], []
    for b in order:
        blk = ctx[b]
        starts.append(len(out))
        out.extend(ids[blk.start : blk.end])
        ends.append(len(out))
        out.extend([pad_id] * (-blk.num_tokens % page_size))
        pends.append(len(out))
        offs.append(offsets[b])
    final_start = len(out)
    out.extend(ids[layout.final.start : layout.final.end])
    return out, PagedLayout(tuple(starts), tuple(ends), tuple(pends), tuple(offs), final_start, offsets[-1])


def padded_length(layout: BlockLayout, page_size: int) -> int:
    """Length of the prompt once its non-final blocks are padded to pages."""
    return sum(-(-b.num_tokens // page_size) * page_size for b in layout.context_blocks) + layout.final.num_tokens
