"""Triton paged block-attention decode: one final-block query per sequence, split-K.

Stage 1, one program per (sequence, KV head, split): the ``GROUP = Hq // Hkv`` query heads of one KV
head share every K/V tile it loads (GQA), and the sequence's KV tiles are cut into ``num_splits``
contiguous ranges, so a long context keeps many programs busy. Each program writes its unnormalised
partial output with its running max and sum. Stage 2, one program per (sequence, query head), merges
the splits with their log-sum-exp.

The query sits at slot ``seq_len - 1``, is final, and sees every real slot ``0 .. seq_len - 1``; keys of
context pages are read rotated by their page's delta (by rotating the query by ``-delta``, once per
tile: :func:`_common._attend_tile`).

:func:`block_attention_decode_rows` runs the same kernels on the single-query rows of a mixed batch
(prefill's arguments plus a row list): program ``i`` takes row ``rows[i]``, whose query is token
``query_start_loc[rows[i]]`` of ``q``, and reads that token's ``q_kv_start``/``q_is_final`` (a
one-token chunk of a non-final block is not final and sees only its own block). Entries ``-1`` are
skipped, so a fixed-size row buffer serves padded (CUDA-graph) batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, NEG_BIG, _attend_tile, _rmax, _rsum, check_common, check_launch_device, check_out,
                      check_prefill_extra, check_rows, dot_flags, half_pad, triton_interpreted)

MAX_SPLITS = 64


@triton.jit(do_not_specialize=["stride_bt", "stride_pd", "stride_pv"])
def _decode_partial_kernel(
    rows_ptr,           # *int32 [R]: batch row of program i (INDEXED only; -1: skip)
    qsl_ptr,            # *int32 [S + 1]: the row's query token (INDEXED only)
    kv_start_ptr,       # *int32 [T] (INDEXED only)
    is_final_ptr,       # *int8 [T] (INDEXED only)
    q_ptr,              # *DT [S, Hq, D] ([T, Hq, D] when INDEXED)
    k_ptr, v_ptr,       # *DT [P, PAGE_SIZE, Hkv, D]
    part_acc_ptr,       # *fp32 [S, Hq, num_splits, D_P]: unnormalised partial outputs
    part_ml_ptr,        # *fp32 [S, Hq, num_splits, 2]: running max (log2 domain) and sum
    bt_ptr,             # *int32 [S, max_pages]
    seq_lens_ptr,       # *int32 [S]
    pd_ptr, pv_ptr,     # *int32 [S, >= max_pages]
    inv_freq_ptr,       # *fp32 [D / 2]
    qk_scale,
    stride_qs, stride_qh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_bt, stride_pd, stride_pv,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEXED: tl.constexpr,
):
    prog = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)   # a runtime value: no recompile per batch size
    rows = tl.arange(0, GROUP_P)
    if INDEXED:
        seq = tl.load(rows_ptr + prog).to(tl.int64)
        if seq < 0:
            return
        tok = tl.load(qsl_ptr + seq).to(tl.int64)
        kv_lo = tl.load(kv_start_ptr + tok)
        row_ok = rows < GROUP
        row_final = row_ok & (tl.load(is_final_ptr + tok) != 0)
    else:
        seq = prog
        tok = prog
        kv_lo = 0
        row_ok = rows < GROUP
        row_final = row_ok
    seq_len = tl.load(seq_lens_ptr + seq)
    t_lo = kv_lo // BLOCK_N
    n_tiles = (seq_len + BLOCK_N - 1) // BLOCK_N - t_lo
    per_split = (n_tiles + num_splits - 1) // num_splits
    t0 = t_lo + split * per_split
    t1 = tl.minimum(t0 + per_split, t_lo + n_tiles)

    heads = kv_head * GROUP + rows
    row_lo = tl.full([GROUP_P], 0, dtype=tl.int32) + kv_lo
    row_hi = tl.where(row_ok, seq_len - 1, -1)
    offs_h = tl.arange(0, HALF_P)
    h_ok = row_ok[:, None] & (offs_h < HALF)[None, :]
    q_off = tok * stride_qs + heads[:, None] * stride_qh + offs_h[None, :]
    q_lo = tl.load(q_ptr + q_off, mask=h_ok, other=0.0)            # [GROUP_P, HALF_P]
    q_hi = tl.load(q_ptr + q_off + HALF, mask=h_ok, other=0.0)
    inv_freq = tl.load(inv_freq_ptr + offs_h, mask=offs_h < HALF, other=0.0)

    acc = tl.full([GROUP_P, D_P], 0, dtype=tl.float32)
    l_i = tl.full([GROUP_P], 0, dtype=tl.float32)
    m_i = tl.full([GROUP_P], NEG_BIG, dtype=tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    pd_row = pd_ptr + seq * stride_pd
    pv_row = pv_ptr + seq * stride_pv
    for t in range(t0, t1):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q_lo, q_hi, row_final, row_lo, row_hi, inv_freq, t * BLOCK_N, seq_len,
            bt_row, pd_row, pv_row, k_ptr, v_ptr, kv_head,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, qk_scale,
            BLOCK_N, PAGE_SIZE, HALF, HALF_P, D, D_P, UPCAST_DOT, DOT_PRECISION)

    part = (prog * (GROUP * tl.num_programs(1)) + heads) * num_splits + split       # [GROUP_P]
    offs_d = tl.arange(0, D_P)
    tl.store(part_acc_ptr + part[:, None] * D_P + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    rows_ptr,           # *int32 [R] (INDEXED only)
    qsl_ptr,            # *int32 [S + 1] (INDEXED only)
    part_acc_ptr,       # *fp32 [S, Hq, num_splits, D_P]
    part_ml_ptr,        # *fp32 [S, Hq, num_splits, 2]
    out_ptr,            # *DT [S, Hq, D]
    stride_os, stride_oh,
    num_splits,
    SPLITS_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,   # SPLITS_P: num_splits rounded up to 2^k
    INDEXED: tl.constexpr,
):
    prog = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if INDEXED:
        seq = tl.load(rows_ptr + prog).to(tl.int64)
        if seq < 0:
            return
        tok = tl.load(qsl_ptr + seq).to(tl.int64)
    else:
        tok = prog
    part = (prog * tl.num_programs(1) + head) * num_splits
    offs_s = tl.arange(0, SPLITS_P)
    s_ok = offs_s < num_splits
    m = tl.load(part_ml_ptr + (part + offs_s) * 2, mask=s_ok, other=NEG_BIG)
    l = tl.load(part_ml_ptr + (part + offs_s) * 2 + 1, mask=s_ok, other=0.0)
    offs_d = tl.arange(0, D_P)
    acc = tl.load(part_acc_ptr + (part + offs_s)[:, None] * D_P + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    w = tl.exp2(m - _rmax(m, axis=0))                                              # [SPLITS_P]
    total = _rsum(l * w, axis=0)
    out = _rsum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + tok * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


def num_splits(device: torch.device, num_seqs: int, kv_heads: int, max_slots: int) -> int:
    """Splits per sequence: enough programs to fill the GPU twice over (on CPU, enough to exercise
    the merge), never more than the longest sequence has tiles (counted at the smallest tile, 32)."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
    max_tiles = max(1, triton.cdiv(max_slots, 32))
    return max(1, min(MAX_SPLITS, max_tiles, triton.cdiv(target, max(1, num_seqs * kv_heads))))


def _block_n(on_gpu: bool, head_dim: int) -> int:
    # D=256 with 64-slot tiles reaches 251 registers (compile_check); the CPU interpreter takes 32
    return 64 if on_gpu and head_dim <= 128 else 32


def decode_meta(dtype: torch.dtype, head_dim: int, group: int, page_size: int, splits: int, on_gpu: bool,
                interpreted: bool, indexed: bool = False) -> tuple[dict, dict, dict]:
    """``(partial-kernel constexprs, launch options, merge-kernel constexprs)``."""
    upcast, precision = dot_flags(dtype, interpreted)
    half_p = half_pad(head_dim)
    consts = dict(GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),
                  BLOCK_N=_block_n(on_gpu, head_dim), PAGE_SIZE=page_size, HALF=head_dim // 2, HALF_P=half_p,
                  D=head_dim, D_P=2 * half_p, UPCAST_DOT=upcast, DOT_PRECISION=precision, INDEXED=indexed)
    options = dict(num_warps=4, num_stages=2) if on_gpu else {}
    merge = dict(SPLITS_P=triton.next_power_of_2(splits), D=head_dim, D_P=2 * half_p, INDEXED=indexed)
    return consts, options, merge


def block_attention_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, page_delta: torch.Tensor,
                           page_valid: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Paged block attention for one final-block query per sequence (Triton, split-K).

    Shapes: q/out ``[S, Hq, D]`` (query of sequence ``s`` at slot ``seq_lens[s] - 1``); key_cache/
    value_cache ``[P, page_size, Hkv, D]``; block_table, page_delta, page_valid ``[S, max_pages]``
    int32; seq_lens ``[S]`` int32 (>= 1); inv_freq ``[D/2]`` float32. Returns ``out``. No host sync.
    """
    hq, hkv, d, page_size, s = check_common(q, key_cache, value_cache, block_table, seq_lens, page_delta,
                                            page_valid, inv_freq, scale)
    if q.shape[0] != s:
        raise ValueError(f"q must be [seqs, q_heads, head_dim] with one query per sequence: q has "
                         f"{q.shape[0]} rows, block_table {s}")
    check_launch_device(q)
    out = check_out(out, q)
    return _launch(q, key_cache, value_cache, block_table, seq_lens, page_delta, page_valid, inv_freq, scale, out,
                   s, hq, hkv, d, page_size, None)


def block_attention_decode_rows(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                                q_kv_start: torch.Tensor, q_is_final: torch.Tensor, page_delta: torch.Tensor,
                                page_valid: torch.Tensor, inv_freq: torch.Tensor, scale: float, rows: torch.Tensor,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """The split-K decode kernel on the single-query rows ``rows`` of a mixed batch.

    Arguments as :func:`block_attention_prefill` (``q``/``out`` ``[T, Hq, D]``), plus ``rows`` ``[R]``
    int32: batch rows that have exactly one query this step (``-1`` entries are skipped). Row ``r``'s
    query is token ``query_start_loc[r]`` at slot ``seq_lens[r] - 1``; it sees ``[q_kv_start, own slot]``,
    rotated if ``q_is_final``, exactly as the prefill kernel would compute it. Output rows of tokens not
    listed are left untouched. No host sync.
    """
    hq, hkv, d, page_size, s = check_common(q, key_cache, value_cache, block_table, seq_lens, page_delta,
                                            page_valid, inv_freq, scale)
    check_prefill_extra(q, query_start_loc, q_kv_start, q_is_final, s)
    check_rows(rows, q, "rows")
    check_launch_device(q)
    out = check_out(out, q)
    if q_is_final.dtype == torch.bool:
        q_is_final = q_is_final.view(torch.int8)
    return _launch(q, key_cache, value_cache, block_table, seq_lens, page_delta, page_valid, inv_freq, scale, out,
                   rows.shape[0], hq, hkv, d, page_size, (rows, query_start_loc, q_kv_start, q_is_final))


def _launch(q, key_cache, value_cache, block_table, seq_lens, page_delta, page_valid, inv_freq, scale, out,
            n, hq, hkv, d, page_size, indexed):
    if n == 0 or q.shape[0] == 0:
        return out
    splits = num_splits(q.device, n, hkv, block_table.shape[1] * page_size)
    consts, options, merge = decode_meta(q.dtype, d, hq // hkv, page_size, splits, q.device.type == "cuda",
                                         triton_interpreted(), indexed is not None)
    part_acc = torch.empty(n, hq, splits, consts["D_P"], dtype=torch.float32, device=q.device)
    part_ml = torch.empty(n, hq, splits, 2, dtype=torch.float32, device=q.device)
    rows, qsl, kv_start, is_final = indexed if indexed is not None else (seq_lens, seq_lens, seq_lens, seq_lens)
    _decode_partial_kernel[(n, hkv, splits)](
        rows, qsl, kv_start, is_final,
        q, key_cache, value_cache, part_acc, part_ml, block_table, seq_lens, page_delta, page_valid, inv_freq,
        float(scale) * LOG2E, q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), page_delta.stride(0), page_valid.stride(0), **consts, **options)
    _decode_merge_kernel[(n, hq)](rows, qsl, part_acc, part_ml, out, out.stride(0), out.stride(1), splits, **merge)
    return out
