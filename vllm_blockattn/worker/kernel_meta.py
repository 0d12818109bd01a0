"""Per-token and per-page metadata for the Triton block-attention kernels (``blockattn_kernels``).

Built from vLLM's batch description (query_start_loc, seq_lens, page size) and each row's
:class:`~vllm_blockattn.core.paged.PagedLayout` (None for an ordinary request, which the kernels then
treat as one final block: plain causal attention). See ``docs/kernels.md`` for the kernel contract.

Each step's rows are split by their query count: rows with one query (decode steps of block and
ordinary requests, and a one-token chunk) take the split-K decode kernel, rows with more take the
prefill kernel; rows without a query (batch padding) take neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.paged import PagedLayout


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
                               inv_freq.to(device), t(decode), t(prefill), t(starts))
