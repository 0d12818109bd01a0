"""Triton paged block-attention prefill: any number of query tokens per sequence.

One program per (tile of query tokens of one sequence, query head or KV head, KV split). The grid has
``T // TOK_M + S`` tiles on axis 0, enough for every sequence whatever its length, without reading
``query_start_loc`` on the host; a program finds its sequence by binary search and leaves when its
tile is past the sequence's queries. With a row list (``rows``, ``rows_query_start``: the prefill rows of a
step whose decode rows take the decode kernel) the tiles enumerate only the listed rows; the others'
output is left untouched. Each program walks the KV slots from the smallest ``q_kv_start``
of its rows to its last row's own slot, ``BLOCK_N`` at a time (:func:`_common._attend_tile`).

Head packing: a program's ``BLOCK_M`` rows are ``TOK_M = BLOCK_M / PACK`` query tokens times the
``PACK`` query heads of one KV head, so each K/V tile it loads serves all of them (``PACK = Hq/Hkv``
when ``TOK_M >= 4``). Split-K: when the unsplit grid is too small to fill the GPU (a short final
block over a long context: 64 queries are one tile per head), axis 2 cuts each tile's KV range into
``splits`` contiguous shares; each writes its unnormalised output, running max and sum, and
:func:`_prefill_merge_kernel` merges them by log-sum-exp.

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


@triton.jit
def _locate(tile_id, rows_ptr, rows_qsl_ptr, qsl_ptr, num_seqs, TOK_M: tl.constexpr, HAS_ROWS: tl.constexpr):
    """``(seq, tile, q_first, q_len)`` of program ``tile_id`` (tiles of ``TOK_M`` query tokens); ``q_len`` is 0
    for a skipped (``-1``) row."""
    if HAS_ROWS:
        idx = _find_seq(rows_qsl_ptr, tile_id, num_seqs, TOK_M)
        seq = tl.load(rows_ptr + idx)
        tile = tile_id - (tl.load(rows_qsl_ptr + idx) // TOK_M + idx)
    else:
        seq = _find_seq(qsl_ptr, tile_id, num_seqs, TOK_M)
        tile = tile_id - (tl.load(qsl_ptr + seq) // TOK_M + seq)
    safe = tl.maximum(seq, 0)
    q_first = tl.load(qsl_ptr + safe)
    q_len = tl.where(seq >= 0, tl.load(qsl_ptr + safe + 1) - q_first, 0)
    return safe, tile, q_first, q_len


# batch-dependent integers are not specialized (a batch of 1, or a block table width that happens to
# be a multiple of 16, would otherwise each compile a new variant)
@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "stride_pd", "stride_pv"])
def _prefill_kernel(
    rows_ptr,         # *int32 [R] rows to run (HAS_ROWS only)
    rows_qsl_ptr,     # *int32 [R + 1] prefix sums of their query counts (HAS_ROWS only)
    q_ptr,            # *DT [T, Hq, D]
    k_ptr, v_ptr,     # *DT [P, PAGE_SIZE, Hkv, D]
    out_ptr,          # *DT [T, Hq, D]
    part_acc_ptr,     # *fp32 [T, Hq, splits, D_P] unnormalised partial outputs (SPLIT only)
    part_ml_ptr,      # *fp32 [T, Hq, splits, 2] running max (log2 domain) and sum (SPLIT only)
    bt_ptr,           # *int32 [S, max_pages]
    qsl_ptr,          # *int32 [S + 1]
    seq_lens_ptr,     # *int32 [S]
    kv_start_ptr,     # *int32 [T]
    is_final_ptr,     # *int8/bool [T]
    pd_ptr, pv_ptr,   # *int32 [S, >= max_pages]
    inv_freq_ptr,     # *fp32 [D / 2]
    num_seqs, num_heads, qk_scale,    # num_seqs: R with HAS_ROWS; num_heads: Hq
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_bt, stride_pd, stride_pv,
    GROUP: tl.constexpr,            # Hq // Hkv
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    PACK: tl.constexpr,             # query heads per program (1, or GROUP: one KV head's heads packed)
    TOK_M: tl.constexpr,            # query tokens per program: BLOCK_M // PACK
    SPLIT: tl.constexpr,            # axis 2 splits the KV range; partials merged by _prefill_merge_kernel
):
    tile_id = tl.program_id(0)
    seq, tile, q_first, q_len = _locate(tile_id, rows_ptr, rows_qsl_ptr, qsl_ptr, num_seqs, TOK_M, HAS_ROWS)
    if tile * TOK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    # row r of the tile: query token tile * TOK_M + r // PACK of the sequence, query head
    # program_id(1) * PACK + r % PACK; every head of a program reads the same KV head
    r = tl.arange(0, BLOCK_M)
    rows = tile * TOK_M + r // PACK
    heads = tl.program_id(1) * PACK + r % PACK
    kv_head = (tl.program_id(1) * PACK) // GROUP
    row_ok = rows < q_len
    tok = (q_first + rows).to(tl.int64)
    own = context + rows
    row_lo = tl.load(kv_start_ptr + tok, mask=row_ok, other=0)
    row_hi = tl.where(row_ok, own, -1)
    row_final = tl.load(is_final_ptr + tok, mask=row_ok, other=0) != 0

    offs_h = tl.arange(0, HALF_P)
    h_ok = row_ok[:, None] & (offs_h < HALF)[None, :]
    q_off = tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_h[None, :]
    q_lo = tl.load(q_ptr + q_off, mask=h_ok, other=0.0)            # [BLOCK_M, HALF_P]
    q_hi = tl.load(q_ptr + q_off + HALF, mask=h_ok, other=0.0)     # [BLOCK_M, HALF_P]
    inv_freq = tl.load(inv_freq_ptr + offs_h, mask=offs_h < HALF, other=0.0)

    acc = tl.full([BLOCK_M, D_P], 0, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    kv_lo = _rmin(tl.where(row_ok, row_lo, seq_len), axis=0)
    kv_hi = _rmax(row_hi, axis=0) + 1
    t_first = kv_lo // BLOCK_N
    t_end = (kv_hi + BLOCK_N - 1) // BLOCK_N
    if SPLIT:   # a contiguous share of the tile's KV tiles (possibly none)
        splits = tl.num_programs(2)
        per = (t_end - t_first + splits - 1) // splits
        t0 = t_first + tl.program_id(2) * per
        t1 = tl.minimum(t0 + per, t_end)
    else:
        t0 = t_first
        t1 = t_end
    seq64 = seq.to(tl.int64)
    bt_row = bt_ptr + seq64 * stride_bt
    pd_row = pd_ptr + seq64 * stride_pd
    pv_row = pv_ptr + seq64 * stride_pv
    for t in range(t0, t1):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q_lo, q_hi, row_final, row_lo, row_hi, inv_freq, t * BLOCK_N, seq_len,
            bt_row, pd_row, pv_row, k_ptr, v_ptr, kv_head,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, qk_scale,
            BLOCK_N, PAGE_SIZE, HALF, HALF_P, D, D_P, UPCAST_DOT, DOT_PRECISION)

    offs_d = tl.arange(0, D_P)
    if SPLIT:
        part = (tok * num_heads + heads) * tl.num_programs(2) + tl.program_id(2)           # [BLOCK_M]
        tl.store(part_acc_ptr + part[:, None] * D_P + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]    # a row that sees no slot gives zeros
        o_off = tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _prefill_merge_kernel(
    rows_ptr, rows_qsl_ptr, qsl_ptr,  # as _prefill_kernel
    part_acc_ptr, part_ml_ptr,        # *fp32 [T, Hq, splits, D_P], [T, Hq, splits, 2]
    out_ptr,                          # *DT [T, Hq, D]
    num_seqs, num_heads, num_splits, stride_ot, stride_oh,
    MERGE_M: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    """Merge the KV splits of ``MERGE_M`` query tokens of one head by their log-sum-exp."""
    seq, tile, q_first, q_len = _locate(tl.program_id(0), rows_ptr, rows_qsl_ptr, qsl_ptr, num_seqs, MERGE_M,
                                        HAS_ROWS)
    if tile * MERGE_M >= q_len:
        return
    head = tl.program_id(1)
    rows = tile * MERGE_M + tl.arange(0, MERGE_M)
    ok = rows < q_len
    tok = (q_first + rows).to(tl.int64)
    offs_d = tl.arange(0, D_P)
    acc = tl.full([MERGE_M, D_P], 0, dtype=tl.float32)
    l_i = tl.full([MERGE_M], 0, dtype=tl.float32)
    m_i = tl.full([MERGE_M], NEG_BIG, dtype=tl.float32)
    for split in range(num_splits):
        part = (tok * num_heads + head) * num_splits + split
        m_s = tl.load(part_ml_ptr + part * 2, mask=ok, other=NEG_BIG)
        l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=ok, other=0.0)
        a_s = tl.load(part_acc_ptr + part[:, None] * D_P + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=ok[:, None] & (offs_d < D)[None, :])


MAX_SPLITS = 64
MERGE_M = 16


def pack_heads(group: int, block_m: int) -> int:
    """Query heads per prefill program: a KV head's ``group`` heads together (each K/V tile load then
    serves all of them) when at least 4 query tokens still fit a tile; else 1."""
    return group if group > 1 and block_m % group == 0 and block_m // group >= 4 else 1


def prefill_splits(device: torch.device, programs: int, max_tiles: int) -> int:
    """KV splits per prefill tile: 1 when the unsplit grid fills the GPU twice over; else enough splits
    to do so (on CPU: enough to exercise the merge), at most one per KV tile and 64."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    if programs >= target:
        return 1
    return max(1, min(MAX_SPLITS, max_tiles, triton.cdiv(target, max(1, programs))))


def prefill_meta(dtype: torch.dtype, head_dim: int, group: int, page_size: int, on_gpu: bool,
                 interpreted: bool, has_rows: bool = False, pack: bool | None = None,
                 split: bool = False) -> tuple[dict, dict]:
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
                  UPCAST_DOT=upcast, DOT_PRECISION=precision, HAS_ROWS=has_rows, SPLIT=split, **tiles)
    p = pack_heads(group, tiles["BLOCK_M"]) if pack is None else (group if pack else 1)
    if tiles["BLOCK_M"] % p:
        raise ValueError(f"cannot pack {p} query heads into tiles of {tiles['BLOCK_M']} rows")
    consts.update(PACK=p, TOK_M=tiles["BLOCK_M"] // p)
    return consts, options


def block_attention_prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            q_kv_start: torch.Tensor, q_is_final: torch.Tensor, page_delta: torch.Tensor,
                            page_valid: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                            rows_query_start: torch.Tensor | None = None, num_splits: int | None = None,
                            pack: bool | None = None, rows_tokens: int | None = None) -> torch.Tensor:
    """Paged block attention for any number of query tokens per sequence (Triton).

    Shapes: q/out ``[T, Hq, D]``; key_cache/value_cache ``[P, page_size, Hkv, D]``; block_table,
    page_delta, page_valid ``[S, max_pages]`` int32; query_start_loc ``[S+1]``, seq_lens ``[S]``,
    q_kv_start ``[T]`` int32; q_is_final ``[T]`` bool/int8; inv_freq ``[D/2]`` float32.
    Returns ``out`` (allocated like ``q`` when not given). No host sync.

    ``rows`` ``[R]`` int32 (with ``rows_query_start`` ``[R + 1]`` int32, the prefix sums of those rows'
    query counts): run only these rows (``-1`` entries are skipped); the other rows' output rows are left
    untouched. A step's decode rows then go to :func:`block_attention_decode_rows`.

    ``num_splits``: KV splits per query tile (merged by log-sum-exp), None to choose from the grid size
    (a short final block over a long context gets many); ``pack``: a KV head's query heads in one
    program (None: when tiles allow, see :func:`pack_heads`). ``rows_tokens``: the listed rows' query
    count (``rows_query_start[-1]``) when the caller knows it on the host: the grid is then sized to
    them rather than to all ``T`` tokens (a mixed step's decode tokens need no prefill tiles).
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
    on_gpu = q.device.type == "cuda"
    consts, options = prefill_meta(q.dtype, d, hq // hkv, page_size, on_gpu, triton_interpreted(),
                                   has_rows=rows is not None, pack=pack)
    if rows_tokens is not None and not (rows is not None and 0 <= rows_tokens <= t):
        raise ValueError(f"rows_tokens must be the listed rows' query count (0..{t}), with rows; got {rows_tokens}")
    tiles = (t if rows_tokens is None else rows_tokens) // consts["TOK_M"] + n
    heads = hq // consts["PACK"]
    if num_splits is None:
        num_splits = prefill_splits(q.device, tiles * heads,
                                    triton.cdiv(block_table.shape[1] * page_size, consts["BLOCK_N"]))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    consts["SPLIT"] = num_splits > 1
    row_args = (rows, rows_query_start) if rows is not None else (query_start_loc, query_start_loc)
    if consts["SPLIT"]:
        part_acc = torch.empty(t, hq, num_splits, consts["D_P"], dtype=torch.float32, device=q.device)
        part_ml = torch.empty(t, hq, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out     # not read
    _prefill_kernel[(tiles, heads, num_splits)](
        *row_args, q, key_cache, value_cache, out, part_acc, part_ml, block_table, query_start_loc, seq_lens,
        q_kv_start, q_is_final, page_delta, page_valid, inv_freq, n, hq, float(scale) * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), page_delta.stride(0), page_valid.stride(0), **consts, **options)
    if consts["SPLIT"]:
        _prefill_merge_kernel[(t // MERGE_M + n, hq)](
            *row_args, query_start_loc, part_acc, part_ml, out, n, hq, num_splits, out.stride(0), out.stride(1),
            MERGE_M=MERGE_M, D=d, D_P=consts["D_P"], HAS_ROWS=rows is not None)
    return out
