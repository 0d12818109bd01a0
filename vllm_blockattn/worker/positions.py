"""Block-aware RoPE positions, computed on the device from per-row buffers written once per request.

vLLM's runner gives every scheduled token its slot index as position (``num_computed + i``, computed on
the device). A block request's tokens need instead (``PagedLayout.positions``):

- in a non-final block: ``slot - start of the slot's block`` (block-local, so cached keys are canonical);
- in the final block and every generated token: ``slot - final_start + final_offset`` (logical; pads take
  no position).

Both are ``slot - shift``, where the shift depends on the request's layout and the slot's page alone: the
block's first slot for a context page (blocks start on page boundaries), ``final_start - final_offset``
from the final block on (which starts on a page boundary too), 0 for an ordinary request. The shifts are
written into a batch row of persistent buffers when the row's occupant changes (``row_buffers``); per step
the device finds each token's row from ``query_start_loc`` and subtracts. No host work per token, no
host read of a device tensor, one kernel chain per step whatever the number of block requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core.paged import PagedLayout
from .row_buffers import PersistentRows


class BlockPositions:
    """Rewrites the runner's positions of block requests in place (see the module docstring)."""

    def __init__(self, page_size: int, device, max_rows: int = 256):
        self.page_size = page_size
        self.device = torch.device(device)
        self.rows = PersistentRows(self.device, {"block_start": 0}, {"final_start": 0, "final_shift": 0},
                                   self._write_row, rows=max_rows, pages=1)
        self._arange = torch.arange(0, device=self.device, dtype=torch.int32)

    def _write_row(self, i: int, layout: PagedLayout | None, h: dict[str, np.ndarray]) -> int:
        if layout is None:
            return 0
        if any(start % self.page_size for start in (*layout.starts, layout.final_start)):
            raise ValueError(f"blockattn: a layout's blocks do not start on pages of {self.page_size} slots "
                             f"(starts {layout.starts}, final block at {layout.final_start}): the scheduler and "
                             f"the worker disagree on the KV cache block size")
        n = layout.final_start // self.page_size
        col = h["block_start"][i]
        for start, end in zip(layout.starts, layout.padded_ends):
            col[start // self.page_size:end // self.page_size] = start
        h["final_start"][i] = layout.final_start
        h["final_shift"][i] = layout.final_start - layout.final_offset
        return n

    def apply(self, positions: torch.Tensor, query_start_loc: torch.Tensor, layouts: Sequence[PagedLayout | None],
              num_tokens: int) -> None:
        """``positions[:num_tokens]`` hold slot indices of the step's tokens, rows ``0..len(layouts)-1`` in
        ``query_start_loc`` order (``query_start_loc`` on the device, ``len(layouts) + 1`` entries or more):
        subtract each block request token's shift."""
        num_reqs = len(layouts)
        if not num_tokens or not num_reqs:
            return
        pages = max([self.rows.pages] + [lay.final_start // self.page_size for lay in layouts if lay is not None])
        self.rows.ensure(num_reqs, pages)
        self.rows.sync(layouts)
        if self._arange.numel() < num_tokens:
            self._arange = torch.arange(max(num_tokens, 2 * self._arange.numel()), device=self.device,
                                        dtype=torch.int32)
        dev = self.rows.dev
        bounds = query_start_loc[1:num_reqs + 1]
        tok = self._arange[:num_tokens].to(bounds.dtype)
        row = torch.searchsorted(bounds, tok, right=True).clamp_(max=num_reqs - 1)
        slot = positions[:num_tokens]
        page = torch.div(slot, self.page_size, rounding_mode="floor").clamp_(0, self.rows.pages - 1)
        final = slot >= dev["final_start"][row]
        shift = torch.where(final, dev["final_shift"][row], dev["block_start"][row, page])
        slot.sub_(shift)
