"""Per-token and per-page metadata for the Triton block-attention kernels (``blockattn_kernels``).

Built from vLLM's batch description (query_start_loc, seq_lens, page size) and each row's
:class:`~vllm_blockattn.core.paged.PagedLayout` (None for an ordinary request, which the kernels then
treat as one final block: plain causal attention). See ``docs/kernels.md`` for the kernel contract.

Each step's rows are split by their query count: rows with one query (decode steps of block and
ordinary requests, and a one-token chunk) take the split-K decode kernel, rows with more take the
prefill kernel; rows without a query (batch padding) take neither.

:class:`PersistentKernelMetadata` is what the CUDA backend runs: a request's per-page metadata (RoPE
delta, real slots, first slot of its block) and its final block's start depend on its layout alone,
so they are computed once per layout (when the worker first sees it) and written into a batch row of
persistent buffers only when that row's occupant changes (vLLM moves requests between rows); the
device copy is updated only then, from pinned host memory. Per step, on the host: the row split (from
``query_start_loc_cpu``, already on the host); on the device: each query token's ``q_kv_start`` and
``q_is_final``, from ``query_start_loc``, ``seq_lens`` and the per-row buffers. Nothing reads
``seq_lens`` on the host (no GPU-to-CPU sync). :func:`build_kernel_metadata` builds the same metadata
from scratch on the host (the reference the persistent path is tested against).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.paged import PagedLayout
from .row_buffers import PersistentRows


@dataclass
class BlockKernelMetadata:
    q_kv_start: torch.Tensor  # [T] int32 first slot a query may see (its block's start; 0 in the final block)
    q_is_final: torch.Tensor  # [T] int8 1 for final-block queries (they rotate non-final keys by page_delta)
    page_delta: torch.Tensor  # [S, max_pages] int32 logical offset of the page's block (0 for final pages)
    page_valid: torch.Tensor  # [S, max_pages] int32 real slots in the page (pads trail)
    inv_freq: torch.Tensor  # [D / 2] float32
    decode_rows: torch.Tensor  # [R_dec] int32 rows with one query: the split-K decode kernel
    prefill_rows: torch.Tensor  # [R_pre] int32 rows with more: the prefill kernel
    prefill_query_start: torch.Tensor  # [R_pre + 1] int32 prefix sums of the prefill rows' query counts
    prefill_tokens: int | None = None  # their total (host), sizes the prefill grid

    @property
    def num_decode(self) -> int:
        return self.decode_rows.shape[0]

    @property
    def num_prefill(self) -> int:
        return self.prefill_rows.shape[0]

    @property
    def decode_only(self) -> bool:
        return self.num_prefill == 0


def split_rows(query_start_loc: Sequence[int], rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(decode rows, prefill rows, prefill query prefix sums)`` from the host copy of query_start_loc."""
    q_lens = np.diff(np.asarray(query_start_loc[:rows + 1], dtype=np.int64))
    decode = np.flatnonzero(q_lens == 1).astype(np.int32)
    prefill = np.flatnonzero(q_lens > 1).astype(np.int32)
    starts = np.zeros(len(prefill) + 1, np.int32)
    np.cumsum(q_lens[prefill], out=starts[1:])
    return decode, prefill, starts


def build_kernel_metadata(layouts: Sequence[PagedLayout | None], query_start_loc: Sequence[int],
                          seq_lens: Sequence[int], max_pages: int, page_size: int, num_tokens: int,
                          inv_freq: torch.Tensor, device) -> BlockKernelMetadata:
    rows = len(seq_lens)
    q_kv_start = np.zeros(num_tokens, np.int32)
    q_is_final = np.ones(num_tokens, np.int8)
    page_delta = np.zeros((rows, max_pages), np.int32)
    page_valid = np.full((rows, max_pages), page_size, np.int32)
    for i in range(rows):
        q0, q1, seq = query_start_loc[i], query_start_loc[i + 1], seq_lens[i]
        lay = layouts[i] if i < len(layouts) else None
        if lay is None or q1 == q0:
            continue
        for b in range(lay.num_blocks):
            first, last = lay.starts[b] // page_size, lay.padded_ends[b] // page_size
            page_delta[i, first:last] = lay.offsets[b]
            page_valid[i, first:last] = np.clip(lay.ends[b] - np.arange(first, last) * page_size, 0, page_size)
        slots = np.arange(seq - (q1 - q0), seq)
        ctx = slots < lay.final_start
        if ctx.any():
            starts = np.asarray(lay.starts)
            q_kv_start[q0:q1][ctx] = starts[np.searchsorted(starts, slots[ctx], side="right") - 1]
            q_is_final[q0:q1][ctx] = 0

    def t(a):
        return torch.from_numpy(a).to(device, non_blocking=True)

    decode, prefill, starts = split_rows(query_start_loc, rows)
    return BlockKernelMetadata(t(q_kv_start), t(q_is_final), t(page_delta), t(page_valid),
                               inv_freq.to(device), t(decode), t(prefill), t(starts), int(starts[-1]))


@dataclass
class _LayoutPages:
    """Per-page metadata of one layout's context pages (computed once per layout)."""

    layout: PagedLayout
    delta: np.ndarray  # [n_pages] int32
    valid: np.ndarray  # [n_pages] int32
    kv_start: np.ndarray  # [n_pages] int32 first slot of the page's block

    @classmethod
    def of(cls, layout: PagedLayout, page_size: int) -> _LayoutPages:
        n = layout.final_start // page_size
        delta, valid, kv_start = (np.zeros(n, np.int32) for _ in range(3))
        for b in range(layout.num_blocks):
            first, last = layout.starts[b] // page_size, layout.padded_ends[b] // page_size
            delta[first:last] = layout.offsets[b]
            valid[first:last] = np.clip(layout.ends[b] - np.arange(first, last) * page_size, 0, page_size)
            kv_start[first:last] = layout.starts[b]
        return cls(layout, delta, valid, kv_start)


class PersistentKernelMetadata:
    """Per-request kernel metadata kept across steps (see the module docstring).

    ``update`` returns a :class:`BlockKernelMetadata` whose tensors are views of persistent device
    buffers: the same addresses every step (what a captured CUDA graph replays).
    """

    def __init__(self, page_size: int, inv_freq: torch.Tensor, device, max_rows: int = 256,
                 max_pages: int = 1, max_tokens: int = 8192):
        self.page_size = page_size
        self.device = torch.device(device)
        self.inv_freq = inv_freq.to(self.device)
        self._layouts: dict[int, _LayoutPages] = {}
        self.layouts_computed = 0    # layouts whose page metadata was computed
        self.rows = PersistentRows(self.device, {"page_delta": 0, "page_valid": page_size, "page_kv_start": 0},
                                   {"final_start": 0}, self._write_row, max_rows, max_pages)
        self._alloc_step(max_rows, max_tokens)

    @property
    def row_writes(self) -> int:
        """Rows rewritten (a row's occupant changed), for tests and counters."""
        return self.rows.row_writes

    # -- buffers ---------------------------------------------------------------------------------

    def _alloc_step(self, rows: int, tokens: int) -> None:
        """The per-step buffers: row lists and per-token metadata."""
        i32 = dict(dtype=torch.int32)
        pin = self.device.type == "cuda"
        # row lists in one host buffer, one copy: [decode rows | prefill rows | prefill query prefix sums],
        # each region at a fixed offset (a captured decode graph keeps reading the decode region)
        self._lists_rows = rows
        self._lists_host = torch.full((3 * rows + 1,), -1, pin_memory=pin, **i32)
        self._lists_np = self._lists_host.numpy()
        self._lists_dev = torch.full((3 * rows + 1,), -1, device=self.device, **i32)
        self._tokens = tokens
        self._q_kv_start = torch.zeros(tokens, device=self.device, **i32)
        self._q_is_final = torch.ones(tokens, device=self.device, dtype=torch.int8)
        self._arange = torch.arange(tokens, device=self.device, **i32)
        self._decode_high = 0                  # decode-region entries written so far (the rest hold -1)

    def _ensure(self, rows: int, pages: int, tokens: int) -> None:
        grown = self.rows.ensure(rows, pages)
        if grown or tokens > self._tokens:
            self.rows.wait()
            self._alloc_step(self.rows.rows, max(tokens, self._tokens))

    # -- per layout, per row ---------------------------------------------------------------------

    def _pages_of(self, layout: PagedLayout) -> _LayoutPages:
        entry = self._layouts.get(id(layout))
        if entry is None or entry.layout is not layout:   # the entry keeps its layout alive: ids are not reused
            entry = self._layouts[id(layout)] = _LayoutPages.of(layout, self.page_size)
            self.layouts_computed += 1
        return entry

    def _write_row(self, i: int, layout: PagedLayout | None, h: dict[str, np.ndarray]) -> int:
        if layout is None:
            return 0
        pages = self._pages_of(layout)
        n = min(len(pages.delta), self.rows.pages)
        h["page_delta"][i, :n] = pages.delta[:n]
        h["page_valid"][i, :n] = pages.valid[:n]
        h["page_kv_start"][i, :n] = pages.kv_start[:n]
        h["final_start"][i] = layout.final_start
        return n

    def _forget_unused_layouts(self) -> None:
        live = self.rows.live_occupants()
        self._layouts = {k: v for k, v in self._layouts.items() if k in live}

    # -- per step ----------------------------------------------------------------------------------

    def update(self, layouts: Sequence[PagedLayout | None], query_start_loc_cpu: torch.Tensor,
               query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_reqs: int, num_tokens: int,
               max_pages: int) -> BlockKernelMetadata:
        """Metadata of this step: rows ``0..num_reqs-1`` hold ``layouts`` (None: ordinary or padding)."""
        self._ensure(num_reqs, max_pages, num_tokens)
        rows = self.rows
        rows.sync([layouts[i] if i < len(layouts) else None for i in range(num_reqs)])
        if len(self._layouts) > 4 * rows.rows + 64:
            self._forget_unused_layouts()

        decode, prefill, starts = split_rows(query_start_loc_cpu.numpy(), num_reqs)
        nd, npf = len(decode), len(prefill)
        lists, r = self._lists_np, self._lists_rows
        rows.wait()   # the row lists' host buffer too is rewritten only once the last copy out of it is done
        # decode region: this step's rows, then -1 over whatever an earlier (larger) step left, so a graph
        # captured with more rows skips the rest; prefill region and prefix sums after it
        high = max(nd, self._decode_high)
        lists[:nd] = decode
        lists[nd:high] = -1
        self._decode_high = nd
        lists[r:r + npf] = prefill
        lists[2 * r:2 * r + npf + 1] = starts
        self._lists_dev.copy_(self._lists_host, non_blocking=True)      # one copy of 3 x max_num_seqs ints
        rows.record_copies()

        q_kv_start, q_is_final = self._q_kv_start[:num_tokens], self._q_is_final[:num_tokens]
        if num_tokens:
            self._token_metadata(query_start_loc[:num_reqs + 1], seq_lens[:num_reqs], num_reqs, num_tokens,
                                 q_kv_start, q_is_final)
        dev, lists_dev = rows.dev, self._lists_dev
        return BlockKernelMetadata(q_kv_start, q_is_final, dev["page_delta"][:num_reqs],
                                   dev["page_valid"][:num_reqs], self.inv_freq, lists_dev[:nd],
                                   lists_dev[r:r + npf], lists_dev[2 * r:2 * r + npf + 1], int(starts[-1]))

    def _token_metadata(self, qsl: torch.Tensor, seq_lens: torch.Tensor, num_reqs: int, num_tokens: int,
                        q_kv_start: torch.Tensor, q_is_final: torch.Tensor) -> None:
        """Each query token's first visible slot and final flag, on the device (no host sync)."""
        dev = self.rows.dev
        tok = self._arange[:num_tokens]
        row = torch.searchsorted(qsl[1:], tok, right=True, out_int32=True).clamp_(max=num_reqs - 1).long()
        slot = seq_lens[row] - qsl[row + 1] + tok                       # seq_len - q_len + index in row
        page = torch.div(slot, self.page_size, rounding_mode="floor").clamp_(0, self.rows.pages - 1).long()
        q_kv_start.copy_(dev["page_kv_start"][row, page])
        q_is_final.copy_(slot >= dev["final_start"][row])
