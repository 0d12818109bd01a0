"""Triton paged block-attention prefill: any number of query tokens per sequence.

One program per (tile of ``BLOCK_M`` query tokens of one sequence, query head). The grid has
``T // BLOCK_M + S`` tiles on axis 0, enough for every sequence whatever its length, without reading
``query_start_loc`` on the host; a program finds its sequence by binary search and leaves when its
tile is past the sequence's queries. With a row list (``rows``, ``rows_query_start``: the prefill rows of a
step whose decode rows take the decode kernel) the tiles enumerate only the listed rows; the others'
output is left untouched. Each program walks the KV slots from the smallest ``q_kv_start``
of its rows to its last row's own slot, ``BLOCK_N`` at a time (:func:`_common._attend_tile`).

Length terms of sequence ``s`` (vLLM's): ``seq_len = context + q_len``; query ``i`` sits at slot
``context + i``; a non-final-block query sees ``[q_kv_start, own slot]`` of its own block, a final-block
query sees ``[0, own slot]`` with every page's keys rotated by that page's delta; pad slots never.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, NEG_BIG, _attend_tile, _rmax, _rmin, check_common, check_launch_device, check_out,
                      check_prefill_extra, check_rows, dot_flags, half_pad, triton_interpreted)


@triton.jit
def _find_seq(qsl_ptr, tile_id, num_seqs, BLOCK_M: tl.constexpr):
    """Largest ``s`` with ``qsl[s] // BLOCK_M + s <= tile_id`` (the first tile id of sequence ``s``)."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid) // BLOCK_M + mid
        if first <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# batch-dependent integers are not specialized (a batch of 1, or a block table width that happens to
# be a multiple of 16, would otherwise each compile a new variant)
@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "stride_pd", "stride_pv"])
def _prefill_kernel(
    rows_ptr,         # *int32 [R] rows to run (HAS_ROWS only)
    rows_qsl_ptr,     # *int32 [R + 1] prefix sums of their query counts (HAS_ROWS only)
    q_ptr,            # *DT [T, Hq, D]
    k_ptr, v_ptr,     # *DT [P, PAGE_SIZE, Hkv, D]
    out_ptr,          # *DT [T, Hq, D]
    bt_ptr,           # *int32 [S, max_pages]
    qsl_ptr,          # *int32 [S + 1]
    seq_lens_ptr,     # *int32 [S]
    kv_start_ptr,     # *int32 [T]
    is_final_ptr,     # *int8/bool [T]
    pd_ptr, pv_ptr,   # *int32 [S, >= max_pages]
    inv_freq_ptr,     # *fp32 [D / 2]
    num_seqs, qk_scale,               # num_seqs: R with HAS_ROWS
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_bt, stride_pd, stride_pv,
    GROUP: tl.constexpr,            # Hq // Hkv
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    tile_id = tl.program_id(0)
    head = tl.program_id(1)
    if HAS_ROWS:
        idx = _find_seq(rows_qsl_ptr, tile_id, num_seqs, BLOCK_M)
        seq = tl.load(rows_ptr + idx)
        tile = tile_id - (tl.load(rows_qsl_ptr + idx) // BLOCK_M + idx)
        if seq < 0:
            return
        q_first = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_first
    else:
        seq = _find_seq(qsl_ptr, tile_id, num_seqs, BLOCK_M)
        q_first = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_first
        tile = tile_id - (q_first // BLOCK_M + seq)
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    tok = (q_first + rows).to(tl.int64)
    own = context + rows
    row_lo = tl.load(kv_start_ptr + tok, mask=row_ok, other=0)
    row_hi = tl.where(row_ok, own, -1)
    row_final = tl.load(is_final_ptr + tok, mask=row_ok, other=0) != 0

    offs_h = tl.arange(0, HALF_P)
    h_ok = row_ok[:, None] & (offs_h < HALF)[None, :]
    q_off = tok[:, None] * stride_qt + head * stride_qh + offs_h[None, :]
    q_lo = tl.load(q_ptr + q_off, mask=h_ok, other=0.0)            # [BLOCK_M, HALF_P]
    q_hi = tl.load(q_ptr + q_off + HALF, mask=h_ok, other=0.0)     # [BLOCK_M, HALF_P]
    inv_freq = tl.load(inv_freq_ptr + offs_h, mask=offs_h < HALF, other=0.0)

    acc = tl.full([BLOCK_M, D_P], 0, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    kv_lo = _rmin(tl.where(row_ok, row_lo, seq_len), axis=0)
    kv_hi = _rmax(row_hi, axis=0) + 1
    seq64 = seq.to(tl.int64)
    bt_row = bt_ptr + seq64 * stride_bt
    pd_row = pd_ptr + seq64 * stride_pd
    pv_row = pv_ptr + seq64 * stride_pv
    for start in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q_lo, q_hi, row_final, row_lo, row_hi, inv_freq, start, seq_len,
            bt_row, pd_row, pv_row, k_ptr, v_ptr, head // GROUP,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, qk_scale,
            BLOCK_N, PAGE_SIZE, HALF, HALF_P, D, D_P, UPCAST_DOT, DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]    # a row that sees no slot gives zeros
    offs_d = tl.arange(0, D_P)
    o_off = tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])


def prefill_meta(dtype: torch.dtype, head_dim: int, group: int, page_size: int, on_gpu: bool,
                 interpreted: bool, has_rows: bool = False) -> tuple[dict, dict]:
    """``(constexprs, launch options)`` of the prefill kernel; tiles small under the interpreter
    (fast tests that still cross tile and page boundaries), FA-like on a GPU."""
    # GPU choices were checked with compile_check (sm_90, ptxas registers/spills), not tuned on a GPU:
    # 64x64 tiles at D=128 need 8 warps (4 warps: 255 registers and spills); larger heads and fp32
    # take 32x32 tiles.
    if not on_gpu:
        tiles, options = dict(BLOCK_M=16, BLOCK_N=32), {}
    elif head_dim <= 128 and dtype != torch.float32:
        tiles, options = dict(BLOCK_M=64, BLOCK_N=64), dict(num_warps=8, num_stages=2)
    else:
        tiles, options = dict(BLOCK_M=32, BLOCK_N=32), dict(num_warps=8, num_stages=2)
    upcast, precision = dot_flags(dtype, interpreted)
    half_p = half_pad(head_dim)
    consts = dict(GROUP=group, PAGE_SIZE=page_size, HALF=head_dim // 2, HALF_P=half_p, D=head_dim, D_P=2 * half_p,
                  UPCAST_DOT=upcast, DOT_PRECISION=precision, HAS_ROWS=has_rows, **tiles)
    return consts, options


def block_attention_prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            q_kv_start: torch.Tensor, q_is_final: torch.Tensor, page_delta: torch.Tensor,
                            page_valid: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                            rows_query_start: torch.Tensor | None = None) -> torch.Tensor:
    """Paged block attention for any number of query tokens per sequence (Triton).

    Shapes: q/out ``[T, Hq, D]``; key_cache/value_cache ``[P, page_size, Hkv, D]``; block_table,
    page_delta, page_valid ``[S, max_pages]`` int32; query_start_loc ``[S+1]``, seq_lens ``[S]``,
    q_kv_start ``[T]`` int32; q_is_final ``[T]`` bool/int8; inv_freq ``[D/2]`` float32.
    Returns ``out`` (allocated like ``q`` when not given). No host sync.

    ``rows`` ``[R]`` int32 (with ``rows_query_start`` ``[R + 1]`` int32, the prefix sums of those rows'
    query counts): run only these rows (``-1`` entries are skipped); the other rows' output rows are left
    untouched. A step's decode rows then go to :func:`block_attention_decode_rows`.
    """
    hq, hkv, d, page_size, s = check_common(q, key_cache, value_cache, block_table, seq_lens, page_delta,
                                            page_valid, inv_freq, scale)
    check_prefill_extra(q, query_start_loc, q_kv_start, q_is_final, s)
    check_launch_device(q)
    out = check_out(out, q)
    if (rows is None) != (rows_query_start is None):
        raise ValueError("rows and rows_query_start go together")
    if rows is not None:
        check_rows(rows, q, "rows")
        check_rows(rows_query_start, q, "rows_query_start", rows.shape[0] + 1)
    t = q.shape[0]
    n = s if rows is None else rows.shape[0]
    if t == 0 or n == 0:
        return out
    if q_is_final.dtype == torch.bool:
        q_is_final = q_is_final.view(torch.int8)
    consts, options = prefill_meta(q.dtype, d, hq // hkv, page_size, q.device.type == "cuda", triton_interpreted(),
                                   has_rows=rows is not None)
    grid = (t // consts["BLOCK_M"] + n, hq)
    _prefill_kernel[grid](
        rows if rows is not None else query_start_loc,
        rows_query_start if rows is not None else query_start_loc,
        q, key_cache, value_cache, out, block_table, query_start_loc, seq_lens, q_kv_start, q_is_final,
        page_delta, page_valid, inv_freq, n, float(scale) * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), page_delta.stride(0), page_valid.stride(0), **consts, **options)
    return out
