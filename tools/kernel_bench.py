"""GPU check of the block-attention kernels: correctness against the torch path, and throughput vs SDPA.

Runs on a CUDA machine with torch and triton only (no vLLM, package not installed)::

    python -m tools.kernel_bench --json kernels_bench.json
    python -m tools.kernel_bench --quick            # when the package is installed

CPU smoke run of the same code paths at tiny sizes (used by the tests)::

    TRITON_INTERPRET=1 python -m tools.kernel_bench --device cpu --quick

1. Correctness: prefill and decode kernels vs ``block_attention_torch`` (bf16 and fp32, page sizes 16
   and 32, GQA, several sequences per batch with pads, chunked queries, single-token final blocks).
2. Throughput in TFLOP/s of *useful* attention work: only unmasked query-key pairs count,
   ``4 * pairs * head_dim * q_heads`` FLOPs. Prefill: one prompt of 8k / 32k tokens cut into 16, 32,
   64 equal blocks plus a 64-token final block. Decode: a batch of sequences with that layout, one
   final-block query each. Baselines, each reading K/V once per KV head (grouped-query attention:
   never a copy of K/V per query head):

   - ``sdpa``: torch SDPA (flash on CUDA) doing the same useful work on dense, unpaged, pre-rotated
     K/V: one causal call over all blocks batched + one call for the final block against every key
     (prefill, ``enable_gqa``), and for decode one non-causal call in which the query heads of a KV head
     are the rows of one query block (``[B, Hkv, Hq/Hkv, D]`` against ``[B, Hkv, L, D]``: the same
     bytes as our kernel reads);
   - ``vllm_triton``: vLLM's own paged kernel (``unified_attention``, what vLLM's Triton backend runs)
     on the same paged cache and block table, plain causal attention over the whole sequence (for
     prefill that is more work than block attention: its ``useful_pairs`` are its own causal pairs);
   - ``flash_attn``: vLLM's FlashAttention (``vllm.vllm_flash_attn.flash_attn_varlen_func`` with the
     block table), same inputs as ``vllm_triton``.

   Warm TTFT (kernel ``final``): the final block's 64 queries alone over a cached context in 32 blocks,
   ours with the automatic KV split and forced unsplit (what the split buys), against the same baselines.

   A baseline that cannot run (not installed, no CUDA build, unsupported page size) is listed in
   ``skipped`` with the reason. Decode rows report ``kv_gb_per_s``: K/V bytes of the real slots at KV-head
   width, the same count for every implementation.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F

from tools.kernel_cases import SeqSpec, make_case

HEADS = dict(q_heads=32, kv_heads=8, head_dim=128)          # a Llama-3-8B-like layer
TINY_HEADS = dict(q_heads=4, kv_heads=2, head_dim=32)
FINAL_LEN = 64
DECODE_BATCH = 8
TOL = {torch.bfloat16: 3e-2, torch.float32: 2e-4}


def _kernels():
    # imported late so that --device cpu can switch the interpreter on first
    from blockattn_kernels import block_attention_decode, block_attention_prefill, block_attention_torch

    return block_attention_prefill, block_attention_decode, block_attention_torch


def _time_ms(fn, device: torch.device, quick: bool) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100))
    start = time.perf_counter()   # CPU smoke run (interpreter): one call, no warm-up
    fn()
    return (time.perf_counter() - start) * 1e3


def correctness(device: torch.device, quick: bool) -> list[dict]:
    """Max abs error of both Triton kernels against the torch path over mixed layouts."""
    prefill, decode, torch_path = _kernels()
    heads = TINY_HEADS if device.type == "cpu" else HEADS
    k = 1 if device.type == "cpu" else 8
    prefill_specs = [SeqSpec((30 * k, 17 * k, 5), 7 * k), SeqSpec((), 40 * k), SeqSpec((40 * k, 3), 1, q_len=30 * k)]
    decode_specs = [SeqSpec((30 * k, 17 * k, 5), 1, q_len=1), SeqSpec((70 * k,), 3, q_len=1),
                    SeqSpec((), 9 * k, q_len=1)]
    page_sizes = [16] if quick else [16, 32]
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for page_size in page_sizes:
            for kernel, specs in (("prefill", prefill_specs), ("decode", decode_specs)):
                case = make_case(specs, page_size=page_size, dtype=dtype, device=device, seed=1, **heads)
                want = torch_path(*case.prefill_args()).float()
                got = (prefill(*case.prefill_args()) if kernel == "prefill" else decode(*case.decode_args())).float()
                err = float((got - want).abs().max())
                ok = bool(math.isfinite(err) and err <= TOL[dtype])
                results.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), page_size=page_size,
                                    tokens=int(case.q.shape[0]), max_abs_err=err, tol=TOL[dtype], ok=ok))
    return results


def _block_layout(total: int, n_blocks: int, page_size: int) -> tuple[int, ...]:
    """``n_blocks`` equal page-multiple blocks that, with the final block, fill about ``total`` tokens."""
    per = max(page_size, (total - FINAL_LEN) // n_blocks // page_size * page_size)
    return (per,) * n_blocks


def _useful_flops(blocks: tuple[int, ...], final: int, q_len_all: bool, heads: dict) -> tuple[int, int]:
    """(useful query-key pairs, FLOPs) per call: block-causal pairs + the final block over everything."""
    ctx = sum(blocks)
    if q_len_all:
        pairs = sum(n * (n + 1) // 2 for n in blocks) + final * ctx + final * (final + 1) // 2
    else:
        pairs = ctx + final
    return pairs, 4 * pairs * heads["head_dim"] * heads["q_heads"]


def _sdpa(q, k, v, causal):
    """SDPA ``[B, Hq, L, D]`` against ``[B, Hkv, L, D]`` (grouped-query attention without copying K/V),
    flash on CUDA when it takes the inputs."""
    gqa = dict(enable_gqa=True) if q.shape[1] != k.shape[1] else {}
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)


def paged_baselines(device: torch.device) -> tuple[dict, dict]:
    """``({name: fn(case, q_lens, out)}, {name: why skipped})`` for vLLM's paged kernels: each runs plain
    causal attention over the case's paged cache (every sequence's whole KV, its last ``q_len`` slots
    queries)."""
    fns, skipped = {}, {}
    if device.type != "cuda":   # the CPU smoke run: vLLM's Triton kernel under the interpreter, if it can
        try:
            from tools.cuda_cases import enable_vllm_triton_interpreter

            why = enable_vllm_triton_interpreter()
        except Exception as e:  # noqa: BLE001 - vLLM or the plugin not importable
            why = f"{type(e).__name__}: {e}"
        if why:
            return fns, {"vllm_triton": why, "flash_attn": why}
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        def vllm_triton(case, q_lens, out):
            cu, max_q, max_k = _varlen(case, q_lens)
            unified_attention(q=case.q, k=case.key_cache, v=case.value_cache, out=out, cu_seqlens_q=cu,
                              max_seqlen_q=max_q, seqused_k=case.seq_lens, max_seqlen_k=max_k,
                              softmax_scale=case.scale, causal=True, window_size=(-1, -1),
                              block_table=case.block_table, softcap=0, q_descale=None, k_descale=None,
                              v_descale=None)
        fns["vllm_triton"] = vllm_triton
    except Exception as e:  # noqa: BLE001 - recorded
        skipped["vllm_triton"] = f"{type(e).__name__}: {e}"
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        def flash_attn(case, q_lens, out):
            cu, max_q, max_k = _varlen(case, q_lens)
            flash_attn_varlen_func(case.q, case.key_cache, case.value_cache, max_q, cu, max_k,
                                   seqused_k=case.seq_lens, softmax_scale=case.scale, causal=True,
                                   block_table=case.block_table, out=out)
        fns["flash_attn"] = flash_attn
    except Exception as e:  # noqa: BLE001 - recorded
        skipped["flash_attn"] = f"{type(e).__name__}: {e}"
    return fns, skipped


_VARLEN: dict = {}


def _varlen(case, q_lens):
    """(cu_seqlens_q, max q, max k) of a case, built once per case (outside the timed call)."""
    key = id(case)
    if key not in _VARLEN:
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=case.q.device)
        _VARLEN.clear()
        _VARLEN[key] = (cu, max(q_lens), int(case.seq_lens.max()))
    return _VARLEN[key]


def _time_baselines(rows: list, skipped: dict, fns: dict, case, q_lens, base: dict, device, quick) -> None:
    """Time vLLM's paged kernels on ``case`` (a failure at launch is recorded as a skip reason)."""
    for impl, fn in fns.items():
        out = torch.empty_like(case.q)
        try:
            fn(case, q_lens, out)
            ms = _time_ms(lambda: fn(case, q_lens, out), device, quick)
        except Exception as e:  # noqa: BLE001 - e.g. a page size the kernel does not take
            skipped.setdefault(impl, f"{type(e).__name__}: {e}")
            continue
        rows.append(dict(base, impl=impl, ms=ms, tflops=base["useful_flops"] / ms / 1e9,
                         **({"kv_gb_per_s": base["kv_bytes"] / ms / 1e6} if "kv_bytes" in base else {})))


def throughput(device: torch.device, quick: bool, skipped: dict | None = None) -> list[dict]:
    """TFLOP/s of the Triton kernels, of SDPA doing the same useful work, and of vLLM's paged kernels
    (plain causal) on the same cache; baselines that cannot run are put in ``skipped`` with the reason."""
    prefill, decode, _ = _kernels()
    skipped = {} if skipped is None else skipped
    fns, why = paged_baselines(device)
    skipped.update(why)
    heads = TINY_HEADS if device.type == "cpu" else HEADS
    page_size = 16
    if device.type == "cpu":
        totals, block_counts, final, batch = [128], [4], 16, 2
    else:
        totals, block_counts, final, batch = ([8192] if quick else [8192, 32768]), [16, 32, 64], FINAL_LEN, DECODE_BATCH
    group = heads["q_heads"] // heads["kv_heads"]
    dtype = torch.bfloat16
    rows = []
    for total in totals:
        for n_blocks in block_counts:
            blocks = _block_layout(total, n_blocks, page_size)
            # prefill: one prompt, every slot a query
            case = make_case([SeqSpec(blocks, final)], page_size=page_size, dtype=dtype, device=device,
                             nan_fill=False, **heads)
            pairs, flops = _useful_flops(blocks, final, True, heads)
            n_ctx = sum(blocks)
            tr = case.truth[0]
            kd = tr.keys.transpose(0, 1)[None].contiguous()                               # [1, Hkv, L, D]
            vd = tr.values.transpose(0, 1)[None].contiguous()
            qd = case.q.transpose(0, 1)[None]
            blk_q = qd[:, :, :n_ctx].reshape(1, -1, n_blocks, blocks[0], qd.shape[-1]).transpose(1, 2)[0]
            blk_k = kd[:, :, :n_ctx].reshape(1, -1, n_blocks, blocks[0], kd.shape[-1]).transpose(1, 2)[0]
            blk_v = vd[:, :, :n_ctx].reshape(1, -1, n_blocks, blocks[0], vd.shape[-1]).transpose(1, 2)[0]
            fin_q = qd[:, :, n_ctx:]

            def sdpa_prefill():
                _sdpa(blk_q, blk_k, blk_v, True)
                _sdpa(fin_q, kd[:, :, :n_ctx], vd[:, :, :n_ctx], False)
                _sdpa(fin_q, kd[:, :, n_ctx:], vd[:, :, n_ctx:], True)

            out = torch.empty_like(case.q)
            impls = {"triton": lambda: prefill(*case.prefill_args(), out=out), "sdpa": sdpa_prefill}
            for impl, fn in impls.items():
                ms = _time_ms(fn, device, quick)
                rows.append(dict(kernel="prefill", impl=impl, tokens=total, blocks=n_blocks, block_len=blocks[0],
                                 final=final, useful_pairs=pairs, useful_flops=flops, ms=ms,
                                 tflops=flops / ms / 1e9))
            seq = int(case.seq_lens[0])
            causal_pairs = seq * (seq + 1) // 2
            _time_baselines(rows, skipped, fns, case, [seq],
                            dict(kernel="prefill", tokens=total, blocks=n_blocks, block_len=blocks[0], final=final,
                                 useful_pairs=causal_pairs, useful_flops=4 * causal_pairs * heads["head_dim"]
                                 * heads["q_heads"], work="plain causal over the whole prompt"), device, quick)
            del case, kd, vd, qd, blk_q, blk_k, blk_v, fin_q, out

            # decode: `batch` sequences with this layout, one final-block query each
            case = make_case([SeqSpec(blocks, 1, q_len=1)] * batch, page_size=page_size, dtype=dtype, device=device,
                             nan_fill=False, seed=2, **heads)
            pairs, flops = _useful_flops(blocks, 1, False, heads)
            pairs, flops = pairs * batch, flops * batch
            kd = torch.stack([t.keys for t in case.truth]).transpose(1, 2)                # [B, Hkv, L, D]
            vd = torch.stack([t.values for t in case.truth]).transpose(1, 2)
            real = ~case.truth[0].is_pad
            kd, vd = kd[:, :, real].contiguous(), vd[:, :, real].contiguous()         # useful keys only
            b, hq, d = case.q.shape
            qd = case.q.reshape(b, heads["kv_heads"], group, d)     # a KV head's query heads as its query rows
            out = torch.empty_like(case.q)
            kv_bytes = 2 * batch * kd.shape[2] * heads["kv_heads"] * heads["head_dim"] * kd.element_size()
            impls = {"triton": lambda: decode(*case.decode_args(), out=out), "sdpa": lambda: _sdpa(qd, kd, vd, False)}
            base = dict(kernel="decode", tokens=total, blocks=n_blocks, block_len=blocks[0], final=1, batch=batch,
                        useful_pairs=pairs, useful_flops=flops, kv_bytes=kv_bytes)
            for impl, fn in impls.items():
                ms = _time_ms(fn, device, quick)
                rows.append(dict(base, impl=impl, ms=ms, tflops=flops / ms / 1e9, kv_gb_per_s=kv_bytes / ms / 1e6))
            _time_baselines(rows, skipped, fns, case, [1] * batch, dict(base, work="plain causal, one query"),
                            device, quick)
            del case, kd, vd, qd, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _warm_ttft(rows, skipped, fns, total, block_counts[len(block_counts) // 2], final, heads, page_size, dtype,
                   device, quick)
    return rows


def _warm_ttft(rows, skipped, fns, total, n_blocks, final, heads, page_size, dtype, device, quick) -> None:
    """The warm-cache RAG step: only the final block's ``final`` queries over a cached context (kernel
    ``final``). Ours with its automatic KV split (``triton``) and forced unsplit (``triton_unsplit``),
    SDPA on the same useful work (final queries against the context, then causally against themselves),
    vLLM's kernels on the same paged cache (plain causal: the same pairs)."""
    prefill, _, _ = _kernels()
    blocks = _block_layout(total, n_blocks, page_size)
    case = make_case([SeqSpec(blocks, final, q_len=final)], page_size=page_size, dtype=dtype, device=device,
                     nan_fill=False, seed=3, **heads)
    n_ctx = sum(blocks)
    pairs = final * n_ctx + final * (final + 1) // 2
    flops = 4 * pairs * heads["head_dim"] * heads["q_heads"]
    tr = case.truth[0]
    real = ~tr.is_pad
    kd = tr.keys[real].transpose(0, 1)[None].contiguous()                                # [1, Hkv, ctx + final, D]
    vd = tr.values[real].transpose(0, 1)[None].contiguous()
    qd = case.q.transpose(0, 1)[None]                                                    # [1, Hq, final, D]

    def sdpa_final():
        _sdpa(qd, kd[:, :, :n_ctx], vd[:, :, :n_ctx], False)
        _sdpa(qd, kd[:, :, n_ctx:], vd[:, :, n_ctx:], True)

    out = torch.empty_like(case.q)
    base = dict(kernel="final", tokens=total, blocks=n_blocks, block_len=blocks[0], final=final, useful_pairs=pairs,
                useful_flops=flops)
    impls = {"triton": lambda: prefill(*case.prefill_args(), out=out),
             "triton_unsplit": lambda: prefill(*case.prefill_args(), out=out, num_splits=1), "sdpa": sdpa_final}
    for impl, fn in impls.items():
        ms = _time_ms(fn, device, quick)
        rows.append(dict(base, impl=impl, ms=ms, tflops=flops / ms / 1e9))
    _time_baselines(rows, skipped, fns, case, [final], dict(base, work="plain causal, the final queries only"),
                    device, quick)


BASELINES = ("triton_unsplit", "sdpa", "vllm_triton", "flash_attn")


def _table(rows: list[dict]) -> str:
    """Milliseconds per implementation; TFLOP/s of useful work for ours and SDPA (the same work)."""
    lines = [f"{'kernel':8} {'tokens':>7} {'blocks':>6} {'triton ms':>10} " + " ".join(f"{b + ' ms':>15}" for b in BASELINES)
             + f" {'triton TFLOP/s':>15} {'sdpa TFLOP/s':>13} {'ratio':>6}"]
    for r in rows:
        if r["impl"] != "triton":
            continue
        same = {b["impl"]: b for b in rows if b["kernel"] == r["kernel"] and b["tokens"] == r["tokens"]
                and b["blocks"] == r["blocks"]}
        sdpa = same["sdpa"]
        cells = " ".join(f"{same[b]['ms']:>15.3f}" if b in same else f"{'-':>15}" for b in BASELINES)
        lines.append(f"{r['kernel']:8} {r['tokens']:>7} {r['blocks']:>6} {r['ms']:>10.3f} {cells} "
                     f"{r['tflops']:>15.2f} {sdpa['tflops']:>13.2f} {r['tflops'] / sdpa['tflops']:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run under TRITON_INTERPRET=1)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (8k tokens only, page size 16 only)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --device cpu for the smoke run)")
    if device.type == "cpu":
        from blockattn_kernels import enable_triton_interpreter

        enable_triton_interpreter()
    import triton

    t0 = time.perf_counter()
    report = dict(device=args.device,
                  device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                               else f"CPU {platform.machine()} (Triton interpreter)"),
                  torch=torch.__version__, triton=triton.__version__, quick=args.quick, heads=HEADS
                  if device.type == "cuda" else TINY_HEADS, dtype="bfloat16")
    report["correctness"] = correctness(device, args.quick)
    for c in report["correctness"]:
        print(f"correctness {c['kernel']:8} {c['dtype']:9} page {c['page_size']:3}: max |err| "
              f"{c['max_abs_err']:.2e} (tol {c['tol']:.0e}) {'ok' if c['ok'] else 'FAIL'}", flush=True)
    report["skipped"] = {}
    report["throughput"] = throughput(device, args.quick, report["skipped"])
    for impl, why in report["skipped"].items():
        print(f"baseline {impl} skipped: {why}")
    print(f"\n{report['device_name']}: useful-work TFLOP/s, bf16, heads {report['heads']}")
    print(_table(report["throughput"]))
    report["seconds"] = time.perf_counter() - t0
    print(f"\ntotal {report['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if not all(c["ok"] for c in report["correctness"]):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
