"""Per-batch-row buffers kept across steps, rewritten only when a row's occupant changes.

What a worker needs per block request (its pages' block starts, RoPE deltas, its final block's start) depends
on the request's layout alone, but vLLM moves requests between batch rows (``InputBatch.condense`` after a
request finishes, swaps on reordering). :class:`PersistentRows` keeps one row of host and device buffers per
batch row and remembers which layout object (its *occupant*) each row holds: a step compares occupants by
identity and rewrites, on the host, only the rows that changed, then copies that range to the device in one
copy per buffer. On CUDA the host side is pinned and the copies are asynchronous; a host buffer is rewritten
only after the previous step's copies out of it are done (an event, not a device-wide sync). On CPU the device
buffers are separate copies too, so host writes stay unseen until copied, as on a GPU.

Used by the CUDA backend's kernel metadata (``kernel_meta.PersistentKernelMetadata``) and by the worker's
block positions (``positions.BlockPositions``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

UNSET = object()   # the occupant of a row whose buffers hold nothing known yet (before its first write)


class PersistentRows:
    """Named ``[rows, pages]`` and ``[rows]`` int32 buffers, host and device, one row per batch row.

    Args:
        device: where the device copies live.
        page_columns: ``{name: fill}`` of the per-page buffers (``[rows, pages]``; ``fill`` outside a
            row's written pages).
        row_columns: ``{name: fill}`` of the per-row buffers (``[rows]``).
        write_row: ``write_row(i, occupant, views) -> pages written``: fills row ``i`` of the numpy
            ``views`` (name -> host array) for ``occupant`` (None: an ordinary request or padding row); the
            row holds the fills when it is called.
        rows, pages: initial sizes (``ensure`` grows them).
    """

    def __init__(self, device, page_columns: Mapping[str, int], row_columns: Mapping[str, int],
                 write_row: Callable[[int, object, dict[str, np.ndarray]], int], rows: int = 256, pages: int = 1):
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._page_fill = dict(page_columns)
        self._row_fill = dict(row_columns)
        self._write_row = write_row
        self._copied: torch.cuda.Event | None = None
        self.row_writes = 0   # rows rewritten (their occupant changed): for tests and counters
        self._alloc(rows, pages)

    def _alloc(self, rows: int, pages: int) -> None:
        self.rows, self.pages = rows, pages
        self.host: dict[str, torch.Tensor] = {}
        self.dev: dict[str, torch.Tensor] = {}
        self.np: dict[str, np.ndarray] = {}
        shapes = {**{n: ((rows, pages), f) for n, f in self._page_fill.items()},
                  **{n: ((rows,), f) for n, f in self._row_fill.items()}}
        for name, (shape, fill) in shapes.items():
            self.host[name] = torch.full(shape, fill, dtype=torch.int32, pin_memory=self._pin)
            self.dev[name] = self.host[name].to(self.device, copy=True)
            self.np[name] = self.host[name].numpy()
        self.owner: list = [UNSET] * rows
        self._row_pages = [pages] * rows   # pages of the row that may differ from the fills

    def ensure(self, rows: int, pages: int) -> bool:
        """Reallocate (every row unknown again) when ``pages`` differs or ``rows`` is more than held;
        returns whether it did. Device addresses change only here."""
        if pages == self.pages and rows <= self.rows:
            return False
        self.wait()
        self._alloc(max(rows, self.rows), pages)
        return True

    def wait(self) -> None:
        """Block until the last copies out of the host buffers are done (they may then be rewritten)."""
        if self._copied is not None and not torch.cuda.is_current_stream_capturing():
            self._copied.synchronize()
            self._copied = None

    def sync(self, occupants: Sequence) -> list[int]:
        """Rows ``0..len(occupants)-1`` hold ``occupants``: rewrite the rows whose occupant changed and copy
        them to the device. Returns the rewritten rows."""
        changed = [i for i, occ in enumerate(occupants) if self.owner[i] is not occ]
        if not changed:
            return changed
        self.wait()
        views = self.np
        for i in changed:
            old = self._row_pages[i]
            for name, fill in self._page_fill.items():
                views[name][i, :old] = fill
            for name, fill in self._row_fill.items():
                views[name][i] = fill
            self._row_pages[i] = self._write_row(i, occupants[i], views)
            self.owner[i] = occupants[i]
            self.row_writes += 1
        lo, hi = changed[0], changed[-1] + 1
        for name in self.dev:
            self.dev[name][lo:hi].copy_(self.host[name][lo:hi], non_blocking=True)
        self.record_copies()
        return changed

    def record_copies(self) -> None:
        if self._pin and not torch.cuda.is_current_stream_capturing():
            self._copied = torch.cuda.Event()
            self._copied.record()

    def live_occupants(self) -> set[int]:
        """``id`` of every layout some row holds."""
        return {id(o) for o in self.owner if o is not None and o is not UNSET}
