"""Pieces shared by the prefill and decode kernels: input checks, the interpreter switch, the tile step.

The tile step (:func:`_attend_tile`) is the whole of block attention's arithmetic for one tile of
``BLOCK_N`` KV slots against ``M`` query rows: gather the tile through the block table, apply the
per-page RoPE delta for final-block rows, mask, and fold the tile into an online softmax.

RoPE delta: a final row reading a key of delta ``d`` uses ``R(-d) q . k`` (equal to ``q . R(d) k``), so
the keys are used as stored and only the query rows are rotated: ``D/2`` sin/cos and ``M*D``
multiply-adds per tile, whatever the tile width, instead of ``BLOCK_N*D/2`` sin/cos for the keys.
All slots of a page share one delta, and blocks are page-aligned, so a tile inside one block has one
delta and takes one pass. A tile straddling blocks takes one pass per distinct delta, each pass
masked to that delta's slots (a first version rotated the keys there instead and computed plain
and rotated scores side by side: ptxas reported 255 registers and 2 KiB of spills at 64x64x128).
Tiles with no final row, or whose delta is 0, skip the rotation.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32,)
_KERNEL_MODULES = ("blockattn_kernels._common", "blockattn_kernels.prefill", "blockattn_kernels.decode")

# Finite "minus infinity" for the running max: a row that has seen no key yet keeps it, so
# exp2(m_old - m_new) stays 1 and exp2(-inf - m) stays 0 (never inf - inf = nan).
NEG_BIG = tl.constexpr(-1.0e30)
BIG_INT = tl.constexpr(1 << 30)  # above any RoPE delta
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Interpreter switch
# ----------------------------------------------------------------------------------------------

def triton_interpreted() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_attend_tile, InterpretedFunction)


def enable_triton_interpreter() -> None:
    """Set ``TRITON_INTERPRET=1`` and re-decorate the kernels if they were built for a GPU.

    Triton chooses interpreter or compiler when ``@triton.jit`` runs, i.e. at import. Tests (and the
    CPU smoke run of the benchmark) call this so the Triton path runs on CPU whatever was imported
    first. Modules are reloaded in place, so functions imported earlier see the new kernels.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    if triton_interpreted():
        return
    for name in _KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


def check_launch_device(q: torch.Tensor) -> None:
    """Refuse CPU tensors unless the kernels run under the interpreter (clear message, no driver crash)."""
    if q.device.type == "cpu" and not triton_interpreted():
        raise RuntimeError(
            "Triton kernels got CPU tensors but were not built for the interpreter: set "
            "TRITON_INTERPRET=1 before importing blockattn_kernels, or call "
            "blockattn_kernels.enable_triton_interpreter(); on CPU the torch path "
            "(block_attention_torch) is the normal choice")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on {q.device}; expected a CUDA device (or CPU under TRITON_INTERPRET=1)")


# ----------------------------------------------------------------------------------------------
# Input checks (no device sync: only shapes, dtypes, devices)
# ----------------------------------------------------------------------------------------------

def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_common(q, key_cache, value_cache, block_table, seq_lens, page_delta, page_valid, inv_freq,
                 scale) -> tuple[int, int, int, int, int]:
    """Validate the arguments every entry point shares; returns ``(Hq, Hkv, D, page_size, S)``."""
    _expect(q.dim() == 3, f"q must be [tokens, q_heads, head_dim], got shape {tuple(q.shape)}")
    _expect(q.dtype in SUPPORTED_DTYPES, f"q dtype {q.dtype} unsupported; expected one of {SUPPORTED_DTYPES}")
    _, hq, d = q.shape
    _expect(key_cache.dim() == 4, f"key_cache must be [pages, page_size, kv_heads, head_dim], "
                                  f"got shape {tuple(key_cache.shape)}")
    _expect(value_cache.shape == key_cache.shape,
            f"value_cache shape {tuple(value_cache.shape)} != key_cache shape {tuple(key_cache.shape)}")
    _expect(key_cache.dtype == q.dtype and value_cache.dtype == q.dtype,
            f"key_cache/value_cache dtype ({key_cache.dtype}, {value_cache.dtype}) must equal q dtype {q.dtype} "
            "(quantized KV caches are not supported)")
    _, page_size, hkv, dk = key_cache.shape
    _expect(dk == d, f"key_cache head_dim {dk} != q head_dim {d}")
    _expect(d % 2 == 0 and d >= 2, f"head_dim must be even (RoPE pairs the two halves), got {d}")
    _expect(page_size >= 1, f"page_size must be >= 1, got {page_size}")
    _expect(hkv >= 1 and hq % hkv == 0, f"q_heads {hq} must be a multiple of kv_heads {hkv} (GQA)")
    _expect(q.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1,
            "q, key_cache and value_cache must be contiguous in head_dim (stride 1)")
    _expect(block_table.dim() == 2, f"block_table must be [seqs, max_pages], got shape {tuple(block_table.shape)}")
    s = block_table.shape[0]
    _expect(seq_lens.shape == (s,), f"seq_lens must be [{s}] (one per block_table row), got {tuple(seq_lens.shape)}")
    for name, t in (("page_delta", page_delta), ("page_valid", page_valid)):
        _expect(t.dim() == 2 and t.shape[0] == s and t.shape[1] >= block_table.shape[1],
                f"{name} must be [{s}, >= {block_table.shape[1]}] like block_table, got {tuple(t.shape)}")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens), ("page_delta", page_delta),
                    ("page_valid", page_valid)):
        _expect(t.dtype in _INDEX_DTYPES, f"{name} must be int32, got {t.dtype}")
        _expect(t.stride(-1) == 1, f"{name} must be contiguous in its last dimension")
    _expect(inv_freq.shape == (d // 2,), f"inv_freq must be [head_dim // 2] = [{d // 2}], got {tuple(inv_freq.shape)}")
    _expect(inv_freq.dtype == torch.float32, f"inv_freq must be float32, got {inv_freq.dtype}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("block_table", block_table),
                    ("seq_lens", seq_lens), ("page_delta", page_delta), ("page_valid", page_valid),
                    ("inv_freq", inv_freq)):
        _expect(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
    _expect(isinstance(scale, (int, float)) and scale > 0, f"scale must be a positive float, got {scale!r}")
    return hq, hkv, d, page_size, s


def check_prefill_extra(q, query_start_loc, q_kv_start, q_is_final, num_seqs: int) -> None:
    """Validate the per-token arguments of the prefill entry points."""
    t = q.shape[0]
    _expect(query_start_loc.shape == (num_seqs + 1,),
            f"query_start_loc must be [seqs + 1] = [{num_seqs + 1}], got {tuple(query_start_loc.shape)}")
    _expect(query_start_loc.dtype == torch.int32, f"query_start_loc must be int32, got {query_start_loc.dtype}")
    _expect(q_kv_start.shape == (t,), f"q_kv_start must be [tokens] = [{t}], got {tuple(q_kv_start.shape)}")
    _expect(q_kv_start.dtype == torch.int32, f"q_kv_start must be int32, got {q_kv_start.dtype}")
    _expect(q_is_final.shape == (t,), f"q_is_final must be [tokens] = [{t}], got {tuple(q_is_final.shape)}")
    _expect(q_is_final.dtype in (torch.bool, torch.int8, torch.uint8, torch.int32),
            f"q_is_final must be bool or int8, got {q_is_final.dtype}")
    for name, x in (("query_start_loc", query_start_loc), ("q_kv_start", q_kv_start), ("q_is_final", q_is_final)):
        _expect(x.device == q.device, f"{name} is on {x.device} but q is on {q.device}")
        _expect(x.stride(-1) == 1 or x.numel() <= 1, f"{name} must be contiguous")


def check_rows(rows, q, name: str, length: int | None = None) -> None:
    """A row list (``rows``/``rows_query_start``): int32, 1-D, contiguous, on q's device."""
    _expect(rows.dim() == 1 and (length is None or rows.shape[0] == length),
            f"{name} must be 1-D" + (f" of length {length}" if length is not None else "") +
            f", got shape {tuple(rows.shape)}")
    _expect(rows.dtype == torch.int32, f"{name} must be int32, got {rows.dtype}")
    _expect(rows.device == q.device, f"{name} is on {rows.device} but q is on {q.device}")
    _expect(rows.stride(-1) == 1 or rows.numel() <= 1, f"{name} must be contiguous")


def check_out(out, q) -> torch.Tensor:
    """Allocate ``out`` like ``q`` or check the one given."""
    if out is None:
        return torch.empty_like(q)
    _expect(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device,
            f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
            f"({tuple(out.shape)}, {out.dtype}, {out.device})")
    _expect(out.stride(-1) == 1, "out must be contiguous in head_dim")
    return out


def dot_flags(dtype: torch.dtype, interpreted: bool) -> tuple[bool, str]:
    """``(UPCAST_DOT, DOT_PRECISION)`` for a storage dtype.

    UPCAST_DOT: Triton's interpreter multiplies bfloat16 bit patterns in ``tl.dot``
    (triton-lang/triton#11584, not supported upstream), so under the interpreter operands are rounded
    to the storage dtype and then widened to float32: the same values the GPU multiplies.
    DOT_PRECISION: "ieee" for float32 inputs (tf32 would lose ~3 digits against the torch path).
    """
    return interpreted and dtype != torch.float32, "ieee" if dtype == torch.float32 else "tf32"


def half_pad(d: int) -> int:
    """Padded width of one RoPE half: a power of two, and >= 16 so ``tl.dot`` accepts it."""
    return max(16, triton.next_power_of_2(d // 2))


# ----------------------------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------------------------

# Reductions go through tl.reduce rather than tl.max/tl.sum: those are @jit functions of
# triton.language itself, decorated once when triton is imported, so kernels using them could not
# switch to the interpreter later (enable_triton_interpreter). The combine functions are Triton's own
# where they exist, because the interpreter recognises them and reduces with numpy (tests run several
# times faster); our copies are the fallback for a Triton that renames them.
@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min2(a, b):
    return tl.minimum(a, b)


@triton.jit
def _add2(a, b):
    return a + b


_max2 = getattr(tl.standard, "_elementwise_max", _max2)
_min2 = getattr(tl.standard, "_elementwise_min", _min2)
_add2 = getattr(tl.standard, "_sum_combine", _add2)


@triton.jit
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max2)


@triton.jit
def _rmin(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _min2)


@triton.jit
def _rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add2)


@triton.jit
def _dot(a, b, DT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``a @ b`` in float32 with operands rounded to the storage dtype ``DT``."""
    a = a.to(DT)
    b = b.to(DT)
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _attend_tile(
    acc, l_i, m_i,                 # running state: [M, D_P] fp32, [M] fp32, [M] fp32 (log2 domain)
    q_lo, q_hi,                    # [M, HALF_P] storage dtype: the two RoPE halves of the query rows
    row_final,                     # [M] int1: row reads other blocks' keys rotated by their delta
    row_lo, row_hi,                # [M] int32: first / last slot the row may see (row_hi < row_lo: none)
    inv_freq,                      # [HALF_P] fp32 (0 in padding)
    start, seq_len,                # first slot of this tile; KV slots of the sequence
    bt_row,                        # *int32 [max_pages]: this sequence's block table row
    pd_row,                        # *int32 [max_pages]: per-page RoPE delta
    pv_row,                        # *int32 [max_pages]: real slots per page
    k_ptr, v_ptr,                  # *DT [P, PAGE_SIZE, Hkv, D]
    kv_head, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    qk_scale,                      # softmax scale * log2(e)
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF_P)
    offs_d = tl.arange(0, D_P)
    in_seq = offs_n < seq_len
    page = offs_n // PAGE_SIZE
    slot = offs_n % PAGE_SIZE
    phys = tl.load(bt_row + page, mask=in_seq, other=0).to(tl.int64)
    key_ok = in_seq & (slot < tl.load(pv_row + page, mask=in_seq, other=0))
    delta = tl.load(pd_row + page, mask=in_seq, other=0)

    k_off = phys * stride_kp + slot * stride_ks + kv_head * stride_kh      # [BLOCK_N]
    v_off = phys * stride_vp + slot * stride_vs + kv_head * stride_vh
    h_ok = key_ok[:, None] & (offs_h < HALF)[None, :]
    k_lo = tl.load(k_ptr + k_off[:, None] + offs_h[None, :], mask=h_ok, other=0.0)           # [BLOCK_N, HALF_P]
    k_hi = tl.load(k_ptr + k_off[:, None] + HALF + offs_h[None, :], mask=h_ok, other=0.0)    # [BLOCK_N, HALF_P]
    v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d < D)[None, :], other=0.0)                      # [BLOCK_N, D_P]
    DT = k_lo.dtype

    n_final = _rmax(row_final.to(tl.int32), 0)
    fin = row_final[:, None]
    d_cur = _rmin(tl.where(in_seq, delta, BIG_INT), 0)
    d_last = _rmax(tl.where(in_seq, delta, -BIG_INT), 0)
    if n_final == 0:          # no row rotates: one pass over the whole tile
        d_last = d_cur
    while d_cur <= d_last:
        if (d_cur == 0) | (n_final == 0):
            qe_lo = q_lo
            qe_hi = q_hi
        else:
            ang = d_cur.to(tl.float32) * inv_freq
            c = tl.cos(ang)[None, :]
            s = tl.sin(ang)[None, :]
            qf_lo = q_lo.to(tl.float32)
            qf_hi = q_hi.to(tl.float32)
            qe_lo = tl.where(fin, qf_lo * c + qf_hi * s, qf_lo).to(q_lo.dtype)
            qe_hi = tl.where(fin, qf_hi * c - qf_lo * s, qf_hi).to(q_hi.dtype)
        scores = (_dot(qe_lo, tl.trans(k_lo), DT, UPCAST_DOT, DOT_PRECISION)
                  + _dot(qe_hi, tl.trans(k_hi), DT, UPCAST_DOT, DOT_PRECISION))
        sel = key_ok & ((delta == d_cur) | (n_final == 0))
        allowed = sel[None, :] & (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] <= row_hi[:, None])
        scores = tl.where(allowed, scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, _rmax(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + _rsum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, DT, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
        d_cur = _rmin(tl.where(in_seq & (delta > d_cur), delta, BIG_INT), 0)
    return acc, l_i, m_i
