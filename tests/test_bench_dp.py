"""The DP routing benchmark (eval/bench_dp.py): its arguments, server settings, per-engine counts,
report and markdown, from fake records and /metrics texts; no server is started."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bd():
    spec = importlib.util.spec_from_file_location("_bench_dp", os.path.join(REPO, "eval", "bench_dp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def metrics_text(success: dict[str, float], cached_hits: float = 0.0, queries: float = 0.0) -> str:
    lines = ["# HELP vllm:request_success_total Count of successfully processed requests.",
             "# TYPE vllm:request_success_total counter"]
    for engine, n in success.items():  # vLLM splits the counter by finish reason
        lines.append(f'vllm:request_success_total{{engine="{engine}",finished_reason="length",'
                     f'model_name="bench"}} {n}')
        lines.append(f'vllm:request_success_total{{engine="{engine}",finished_reason="stop",model_name="bench"}} 1.0')
        lines.append(f'vllm:prefix_cache_hits_total{{engine="{engine}",model_name="bench"}} {cached_hits}')
        lines.append(f'vllm:prefix_cache_queries_total{{engine="{engine}",model_name="bench"}} {queries}')
    return "\n".join(lines) + "\n"


def records(ttfts, cached):
    return [{"ttft": t, "itl": 0.05, "e2e": t + 3.0, "prompt_tokens": 1000, "cached_tokens": c,
             "completion_tokens": 64, "sent_at": float(i)} for i, (t, c) in enumerate(zip(ttfts, cached))]


def test_defaults_and_checks(bd):
    args = bd.parse_args([])
    assert args.systems == ["blockattn-dp-vllm", "blockattn-dp-routed"]
    assert (args.data_parallel_size, args.concurrency, args.requests, args.corpus) == (2, 4, 128, 128)
    assert args.omp_bind == "0|1" and args.block_size == 32
    small = bd.parse_args(["--requests", "8", "--systems", "blockattn-dp-routed"])
    assert small.requests == 8 and small.systems == ["blockattn-dp-routed"]
    for bad in (["--data-parallel-size", "1"], ["--docs-per-request", "9", "--corpus", "8"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            bd.parse_args(bad)


def test_the_systems_differ_only_in_dp_routing(bd):
    args = bd.parse_args([])
    (off, env_off), (on, env_on) = (bd.server_setup(args, bd.SYSTEMS[s]) for s in args.systems)
    assert env_off == env_on and env_on["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert off[:2] == on[:2] == ["--data-parallel-size", "2"]
    assert json.loads(off[off.index("--additional-config") + 1]) == {"blockattn": {"dp_routing": "off"}}
    assert json.loads(on[on.index("--additional-config") + 1]) == {"blockattn": {"dp_routing": "blocks"}}
    assert "VLLM_CPU_OMP_THREADS_BIND" not in bd.server_setup(bd.parse_args(["--omp-bind", ""]), "off")[1]


def test_per_engine_counts(bd):
    before, after = metrics_text({"0": 3.0, "1": 5.0}), metrics_text({"0": 10.0, "1": 30.0, "2": 1.0})
    assert bd.per_engine(before) == {"0": 4.0, "1": 6.0}  # both finish reasons
    assert bd.engine_delta(before, after) == {"0": 7, "1": 25, "2": 2}
    assert bd.engine_delta("", "") == {}


def test_summary_comparison_and_markdown(bd):
    argv = ["--requests", "4", "--out", "outputs/x"]
    args = bd.parse_args(argv)
    vllm = bd.summarize(records([1.0, 2.0, 3.0, 2.0], [0, 500, 500, 200]), 8.0,
                        metrics_text({"0": 0, "1": 0}), metrics_text({"0": 2, "1": 2}, 300.0, 1000.0))
    routed = bd.summarize(records([0.5, 1.0, 1.0, 0.5], [0, 800, 800, 800]) + [{"error": "HTTP 500", "e2e": 1.0}],
                          4.0, metrics_text({"0": 0, "1": 0}), metrics_text({"0": 4, "1": 0}, 600.0, 1000.0))
    assert vllm["requests_per_engine"] == {"0": 2, "1": 2} and routed["requests_per_engine"] == {"0": 4, "1": 0}
    assert vllm["usage_cached_fraction"] == pytest.approx(0.3) and routed["usage_cached_fraction"] == pytest.approx(0.6)
    assert routed["requests"] == 5 and routed["errors"] == 1 and routed["requests_per_s"] == pytest.approx(1.0)
    assert vllm["prefix_cache_hit_rate"] == pytest.approx(0.3)  # summed over both engines' samples
    report = {"provenance": {"command": "python eval/bench_dp.py " + " ".join(argv), "cpu": "Test CPU",
                             "machine": "x86_64, 2 cores", "vllm_version": "0.0", "dtype": "float32", "model": "m",
                             "data_parallel_size": 2, "omp_bind": "0|1", "concurrency": 4, "block_size": 32,
                             "vllm_blockattn_commit": "abcdef1234567", "uncommitted_changes": [],
                             "date": "2026-12-07T18:00:00+00:00", "total_s": 600.0},
              "config": {"requests": args.requests, "corpus": 128, "doc_tokens": 256, "docs_per_request": 8,
                         "zipf": 1.1, "answer_tokens": 64},
              "document_reuse_ceilings": {"block_reuse": 0.75},
              "systems": {"blockattn-dp-vllm": {"dp_routing": "off", "aggregate": vllm},
                          "blockattn-dp-routed": {"dp_routing": "blocks", "aggregate": routed}}}
    cmp_ = bd.comparison(report)
    assert cmp_["ttft_mean"] == pytest.approx(0.75 / 2.0) and cmp_["requests_per_s"] == pytest.approx(2.0)
    assert cmp_["cached_routed"] == pytest.approx(0.6) and cmp_["cached_vllm"] == pytest.approx(0.3)
    md = bd.markdown(report)
    assert md.splitlines()[0] == "`python eval/bench_dp.py --requests 4 --out outputs/x`"
    assert "Test CPU" in md and "commit abcdef1234," in md and "10 min" in md
    assert "| blockattn-dp-vllm | off | 4 | 2.00 / 2.00 / 2.97 | 50.0 | 0.500 | 30.0% | 2 / 2 |" in md
    assert "| blockattn-dp-routed | blocks | 5 (1 failed) | 0.75 / 0.75 / 1.00 | 50.0 | 1.000 | 60.0% | 4 / 0 |" in md
    assert "routed / vllm: TTFT mean 0.38x" in md and "cached tokens 60.0% routed vs 30.0%" in md
    assert "75.0% of the retrieved documents" in md
    # a failed system is a row, and no comparison line
    report["systems"]["blockattn-dp-routed"] = {"dp_routing": "blocks", "failed": "ServerError: boom"}
    md = bd.markdown(report)
    assert "| blockattn-dp-routed | blocks | failed |" in md and "routed / vllm" not in md
    assert bd.comparison(report) is None
