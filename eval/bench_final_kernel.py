"""Microbenchmark of the native CPU final-block kernel (``vllm_blockattn/csrc/final_attention.cpp``) alone.

    python eval/bench_final_kernel.py                       # default shapes, markdown table on stdout
    python eval/bench_final_kernel.py --baseline-source old.cpp   # also time another copy of the source

One request per step: ``--contexts`` tokens of context in blocks of ``--block-len`` tokens (canonical
keys, each block with its own query rotation), then a final block of ``--queries`` new tokens, all of
them queries (a chat turn or question at prefill; 1 = a decode step). Pages are scattered in a random
vLLM-layout CPU cache (K column-major, V row-major: the "vec" layout, page 32). Per shape it reports
the kernel's ms per step and effective GFLOP/s (useful work only: ``4 * D`` FLOPs per visible
query-key pair and query head), and as a reference point torch SDPA on the same work with dense,
unpaged K/V (and an explicit causal mask for the final block), which gathers nothing and rotates
nothing. ``--baseline-source`` builds a second copy of the kernel from another file (e.g. the
previous commit's, via ``git show``) and times it on the same inputs.

Defaults: the benchmark model's attention shape (8 query heads, 4 KV heads, head_dim 64; see
``vllm_blockattn/eval/benchkit.py``); ``--hq 32 --hkv 8 --head-dim 128`` is Qwen3-4B's. Threads: torch's
default (all cores) unless ``--threads``. The CPU model is printed with the table: numbers only compare
on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_blockattn import cpu_kernels  # noqa: E402
from vllm_blockattn.eval.benchkit import cpu_model  # noqa: E402

PAGE = 32


def build(source: str | None):
    """The kernel module: the package's (``cpu_kernels.load``) or one built from ``source``."""
    if source is None:
        module = cpu_kernels.load()
        if module is None:
            raise SystemExit(f"the CPU kernel did not build: {cpu_kernels.failure()}")
        return module
    from torch.utils.cpp_extension import load

    with open(source, "rb") as f:
        tag = hashlib.sha1(f.read()).hexdigest()[:10]
    return load(name=f"bench_final_attention_{tag}", sources=[os.path.abspath(source)],
                extra_cflags=cpu_kernels.CFLAGS, extra_ldflags=cpu_kernels.LDFLAGS, verbose=False)


def make_inputs(n_ctx: int, n_q: int, block_len: int, hq: int, hkv: int, d: int, dtype, seed: int = 0):
    """Kernel arguments for one request, plus dense K/V/mask for SDPA and the useful FLOPs."""
    g = torch.Generator().manual_seed(seed)
    blocks = [min(block_len, n_ctx - s) for s in range(0, n_ctx, block_len)]
    spans, slot = [], 0
    for n in blocks:
        spans.append((slot, n))
        slot += -(-n // PAGE) * PAGE
    final_start = slot
    total = final_start + n_q
    used = -(-total // PAGE)
    perm = torch.randperm(used + 8, generator=g)[:used].to(torch.int32)
    cache = (torch.randn(used + 8, hkv, PAGE, 2 * d, generator=g) * 0.5).to(dtype)
    q = torch.randn(n_q, hq, d, generator=g).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    offsets = [float(i * block_len) for i in range(len(blocks))] + [0.0]
    ang = -torch.tensor(offsets)[:, None] * inv_freq[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], dim=1).contiguous()
    sin = torch.cat([ang.sin(), ang.sin()], dim=1).contiguous()
    args = (q, cache, perm[None, :].contiguous(), torch.tensor([0], dtype=torch.int64),
            torch.tensor([n_q], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), torch.tensor([0, len(blocks) + 1], dtype=torch.int32),
            torch.tensor([s // PAGE for s, _ in spans] + [final_start // PAGE], dtype=torch.int32),
            torch.tensor(blocks + [0], dtype=torch.int32), cos, sin, d ** -0.5, True, False)
    # Dense K/V in logical order (values are irrelevant for timing; shapes and masks are what count).
    n_keys = n_ctx + n_q
    k = torch.randn(1, hkv, n_keys, d, generator=g).to(dtype)
    v = torch.randn(1, hkv, n_keys, d, generator=g).to(dtype)
    mask = torch.ones(n_q, n_keys, dtype=torch.bool)
    mask[:, n_ctx:] = torch.ones(n_q, n_q, dtype=torch.bool).tril()
    pairs = n_q * n_ctx + n_q * (n_q + 1) // 2
    flops = 4.0 * d * hq * pairs
    return args, (q.transpose(0, 1)[None].contiguous(), k, v, mask), flops


def timeit(fn, repeat: int, min_time: float, clock=time.perf_counter) -> float:
    """Median seconds per call (at least ``repeat`` calls and ``min_time`` seconds after a warm-up)."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t = clock()
        fn()
        times.append(clock() - t)
        if len(times) >= 50 * repeat:
            break
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", default="1,16,115,512", help="final-block queries per step (comma list)")
    ap.add_argument("--contexts", default="1024,4096,8192", help="context tokens (comma list)")
    ap.add_argument("--block-len", type=int, default=512, help="tokens per context block")
    ap.add_argument("--hq", type=int, default=8, help="query heads")
    ap.add_argument("--hkv", type=int, default=4, help="KV heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="wall time, or this thread's CPU time (needs --threads 1; steadier on a shared machine)")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per shape (at least)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per shape (at least)")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA reference")
    ap.add_argument("--baseline-source", help="another final_attention.cpp to build and time side by side")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread needs --threads 1 (the kernel then runs on the calling thread)")
    clock = time.thread_time if a.clock == "thread" else time.perf_counter

    kernel = build(None)
    baseline = build(a.baseline_source) if a.baseline_source else None
    rows = []
    for dt_name in a.dtypes.split(","):
        dtype = getattr(torch, dt_name.strip())
        for n_q in [int(x) for x in a.queries.split(",")]:
            for n_ctx in [int(x) for x in a.contexts.split(",")]:
                args, (qd, kd, vd, mask), flops = make_inputs(n_ctx, n_q, a.block_len, a.hq, a.hkv, a.head_dim,
                                                              dtype)
                out = torch.empty_like(args[0])
                row = dict(dtype=dt_name, queries=n_q, context=n_ctx, gflop=flops / 1e9)
                row["kernel_ms"] = 1e3 * timeit(lambda: kernel.final_attention(*args, out), a.repeat, a.min_time, clock)
                if baseline is not None:
                    out_b = torch.empty_like(out)
                    row["baseline_ms"] = 1e3 * timeit(lambda: baseline.final_attention(*args, out_b), a.repeat,
                                                      a.min_time, clock)
                    row["max_abs_diff"] = (out.float() - out_b.float()).abs().max().item()
                if not a.no_sdpa:
                    sdpa = torch.nn.functional.scaled_dot_product_attention
                    row["sdpa_ms"] = 1e3 * timeit(
                        lambda: sdpa(qd, kd, vd, attn_mask=mask, enable_gqa=a.hq != a.hkv), a.repeat, a.min_time, clock)
                rows.append(row)
                print(f"  {dt_name} q={n_q} ctx={n_ctx}: kernel {row['kernel_ms']:.2f} ms", file=sys.stderr,
                      flush=True)

    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"Hq={a.hq}, Hkv={a.hkv}, head_dim={a.head_dim}, page {PAGE}, context blocks of {a.block_len}; "
          f"{a.clock} clock, median\n")
    head = "| dtype | queries | context | kernel ms | kernel GFLOP/s |"
    sep = "|---|---:|---:|---:|---:|"
    if baseline is not None:
        head += " baseline ms | speed-up |"
        sep += "---:|---:|"
    if not a.no_sdpa:
        head += " SDPA ms | SDPA GFLOP/s |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['dtype']} | {r['queries']} | {r['context']} | {r['kernel_ms']:.2f} | "
                f"{r['gflop'] / r['kernel_ms'] * 1e3:.1f} |")
        if baseline is not None:
            line += f" {r['baseline_ms']:.2f} | {r['baseline_ms'] / r['kernel_ms']:.2f}x |"
        if not a.no_sdpa:
            line += f" {r['sdpa_ms']:.2f} | {r['gflop'] / r['sdpa_ms'] * 1e3:.1f} |"
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                           args=vars(a), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
