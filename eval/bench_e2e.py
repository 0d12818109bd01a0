"""The whole request: time to first token, inter-token latency and end-to-end latency, stock vs block.

    python eval/bench_e2e.py                                  # CPU defaults (8-layer x 512 random Qwen3)
    python eval/bench_e2e.py --lengths 1024 2048 --batches 1 --new-tokens 32   # quick look
    python eval/bench_e2e.py --model PATH --dtype bfloat16    # a real checkpoint

For each prompt length and batch size (``batch`` requests of that length, each its own documents):

- **stock**: vLLM's own attention with automatic prefix caching; the documents arrive in a new order
  (the RAG case where a prefix cache misses), so TTFT is a cold prefill;
- **block cold**: the ``blockattn`` backend, documents never seen before;
- **block warm**: the same documents in another order: every document comes from the block cache.

Measured per system: TTFT (``max_tokens=1``, wall time of the batch) and the decode inter-token
latency ITL = (T(max_tokens=N) - T(max_tokens=1)) / (N - 1), both timed on a warm prompt (stock: the
exact prompt again, a full prefix-cache hit; block: warm documents) so that prefill noise stays out of
the decode figure. End to end = TTFT + (N - 1) x ITL, and for batch 1 also timed directly (one
``max_tokens=N`` call on a cold prompt for stock and block cold, on a warm one for block warm).
Writes ``e2e.json`` and ``e2e.png`` to ``--out`` and prints a markdown table. Random weights: compute,
not quality, is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

from vllm_blockattn.eval.benchkit import cpu_model, default_bench_model


def timed(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


class Workload:
    """Documents and prompts of one (length, batch) point."""

    def __init__(self, rng, vocab, question, settings, length, batch):
        self.rng, self.question, self.settings = rng, question, settings
        self.n_docs = max(8, min(32, length // 512))
        self.doc_len = max(1, (length - len(question)) // self.n_docs - settings.num_sinks)
        self.vocab, self.batch = vocab, batch

    def fresh(self):
        """New documents for every request of the batch."""
        rng = self.rng
        return [[[rng.choice(self.vocab) for _ in range(self.doc_len)] for _ in range(self.n_docs)]
                for _ in range(self.batch)]

    def shuffled(self, docsets):
        return [self.rng.sample(docs, len(docs)) for docs in docsets]

    def full(self, docsets):
        return [[t for d in docs for t in d] + self.question for docs in docsets]

    def block(self, docsets):
        from vllm_blockattn import build_block_prompt

        return [build_block_prompt(docs + [self.question], self.settings) for docs in docsets]


def measure(llm, mode: str, work: Workload, new_tokens: int, direct: bool) -> dict:
    build = work.full if mode == "stock" else work.block
    docsets = work.fresh()  # never seen by this engine: a cold prefill on both systems
    first = build(docsets)
    out = {"ttft_cold": timed(llm, first, 1)}
    if mode == "stock":
        warm1 = warm2 = first  # the exact prompt again: stock's best case, for a clean decode timing
    else:
        warm1, warm2 = build(work.shuffled(docsets)), build(work.shuffled(docsets))
        out["ttft_warm"] = timed(llm, warm1, 1)
    t1 = timed(llm, warm1, 1)
    tn = timed(llm, warm2, new_tokens)
    out["itl"] = max(tn - t1, 0.0) / (new_tokens - 1)
    if direct:  # end to end timed in one call: cold (stock / block cold), warm (block warm)
        out["e2e_cold_direct"] = timed(llm, build(work.fresh()), new_tokens)
        if mode == "block":
            out["e2e_warm_direct"] = timed(llm, build(work.shuffled(docsets)), new_tokens)
    return out


def run(args) -> dict:
    import gc

    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_blockattn import BlockSettings

    model = args.model or default_bench_model(os.path.join(args.out, "model"))
    tok = AutoTokenizer.from_pretrained(model)
    settings = BlockSettings.from_pretrained(model) or BlockSettings.from_tokenizer(tok)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    question = tok.encode("Question: which document mentions the old mill? Answer:", add_special_tokens=False)
    points = [(b, n) for b in args.batches for n in (args.lengths if b == 1 else args.batch_lengths)]
    max_len = max(n for _, n in points) + 512 + args.new_tokens
    max_batch = max(args.batches)
    rng = random.Random(0)
    works = {(b, n): Workload(rng, vocab, question, settings, n, b) for b, n in points}
    results: dict = {}
    for mode in ("stock", "block"):
        kwargs = dict(model=model, dtype=args.dtype, max_model_len=max_len, enforce_eager=args.enforce_eager,
                      enable_prefix_caching=True, max_num_batched_tokens=max_len, max_num_seqs=max(16, max_batch),
                      seed=0)
        if mode == "block":
            kwargs["attention_backend"] = "blockattn"
        llm = LLM(**kwargs)
        warm = Workload(rng, vocab, question, settings, 1024, 1)  # one-time costs out of the table
        timed(llm, (warm.full if mode == "stock" else warm.block)(warm.fresh()), 4)
        for b, n in points:
            reps = [measure(llm, mode, works[(b, n)], args.new_tokens, direct=b == 1) for _ in range(args.repeats)]
            agg = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
            results.setdefault(f"{b}x{n}", {})[mode] = agg
            print(f"{mode:5s} batch {b:2d} x {n:6d} tokens: " + ", ".join(f"{k} {v:.4f}" for k, v in agg.items()),
                  flush=True)
            llm.reset_prefix_cache()
        del llm
        gc.collect()
    rows = []
    for b, n in points:
        s, k = results[f"{b}x{n}"]["stock"], results[f"{b}x{n}"]["block"]
        tail = args.new_tokens - 1
        row = {"batch": b, "length": n, "stock_ttft": s["ttft_cold"], "block_cold_ttft": k["ttft_cold"],
               "block_warm_ttft": k["ttft_warm"], "stock_itl": s["itl"], "block_itl": k["itl"],
               "stock_e2e": s["ttft_cold"] + tail * s["itl"], "block_cold_e2e": k["ttft_cold"] + tail * k["itl"],
               "block_warm_e2e": k["ttft_warm"] + tail * k["itl"]}
        if b == 1:
            row.update(stock_e2e_direct=s["e2e_cold_direct"], block_cold_e2e_direct=k["e2e_cold_direct"],
                       block_warm_e2e_direct=k["e2e_warm_direct"])
        row["itl_ratio"] = row["block_itl"] / row["stock_itl"] if row["stock_itl"] else float("nan")
        row["warm_e2e_speedup"] = row["stock_e2e"] / row["block_warm_e2e"]
        row["cold_e2e_speedup"] = row["stock_e2e"] / row["block_cold_e2e"]
        row["warm_ttft_speedup"] = row["stock_ttft"] / row["block_warm_ttft"]
        row["cold_ttft_speedup"] = row["stock_ttft"] / row["block_cold_ttft"]
        rows.append(row)
    return {"model": model, "cpu": cpu_model(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "dtype": args.dtype, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["batch"] == 1]
    x = [r["length"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (title, keys) in zip(axes, [
        ("TTFT (s)", (("stock_ttft", "stock (new order)"), ("block_cold_ttft", "block cold"),
                      ("block_warm_ttft", "block warm"))),
        ("inter-token latency (ms)", (("stock_itl", "stock"), ("block_itl", "block"))),
        (f"end to end, {report['new_tokens']} tokens (s)", (("stock_e2e", "stock"), ("block_cold_e2e", "block cold"),
                                                            ("block_warm_e2e", "block warm"))),
    ]):
        for key, label in keys:
            scale = 1000 if "itl" in key else 1
            ax.plot(x, [r[key] * scale for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens (batch 1)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['cpu']} ({report['machine']}), {report['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    lines = ["| batch | prompt tokens | TTFT stock / block cold / block warm (s) | ITL stock / block (ms) | "
             "ITL block/stock | end to end stock / block cold / block warm (s) | e2e speed-up cold / warm |",
             "|---:|---:|---|---|---:|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['batch']} | {r['length']} | {r['stock_ttft']:.2f} / {r['block_cold_ttft']:.2f} / "
            f"{r['block_warm_ttft']:.3f} | {r['stock_itl'] * 1000:.1f} / {r['block_itl'] * 1000:.1f} | "
            f"{r['itl_ratio']:.2f} | {r['stock_e2e']:.2f} / {r['block_cold_e2e']:.2f} / {r['block_warm_e2e']:.2f} | "
            f"{r['cold_e2e_speedup']:.2f}x / {r['warm_e2e_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: a random 8-layer x 512 Qwen3 built under --out)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                    help="prompt lengths at batch 1")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--batch-lengths", type=int, nargs="+", default=[8192], help="prompt lengths at batch > 1")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="outputs/e2e")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "8")
    report = run(args)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(report, os.path.join(args.out, "e2e.png"))
    print(markdown(report))
    print(f"wrote {args.out}/e2e.json and {args.out}/e2e.png")


if __name__ == "__main__":
    main()
