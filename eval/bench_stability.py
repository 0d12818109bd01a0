"""Reuse-stable segmentation: stability of the learned and the rule segmenter, before and after
content-defined cutting, on a mixed corpus; and the learned segmenter's throughput both ways.

    nice -n 19 python eval/bench_stability.py --locomo PATH/locomo10.json --out outputs/stability

Corpus (text on this machine, recorded with its licence in the JSON): prose = the Python
documentation sources (Debian ``python3-doc``, PSF licence); markdown with code = Markdown files from
``/usr/share/doc`` (Node.js, zstd, libffi, OpenSSL: MIT / BSD-3 / Expat / Apache-2.0); code = the
Python standard library's own ``.py`` files (PSF); chat = LoCoMo conversations (``--locomo``,
CC BY-NC 4.0, read for measurement only; skipped without it). Files are cut at blank lines into
documents of ``--min-chars``..``--max-chars``.

For every document: its blocks alone, then its blocks inside ``--contexts`` random contexts (other
documents of any kind before and/or after it, the first one starting at a random line, joined by a
blank line or a line break: ``vllm_blockattn.segmenter.stability.random_contexts``). Stability (by
the learned segmenter's tokenizer's tokens) is the share of the document's tokens in blocks found
byte-identical, cut at both ends, in each context. "interior" restricts it to blocks that lie wholly
inside the document's interior (the candidates/boundaries whose decisions are guaranteed stable by
the *after* method), to show that the guarantee holds and that the *before* method does not have it.

Methods: ``learned fixed`` (before: windows aligned to the text start), ``learned content`` (after:
content-defined windows), ``rule greedy`` (before: ``vllm_blockattn.eval.blocks.rule_based_segments``)
and ``rule content`` (after: ``vllm_blockattn.segmenter.rules.stable_rule_segments``), both with
``--rule-tokens`` tokens at most per block. Throughput: ``candidate_probs`` over every document
alone, one torch thread, best of ``--repeats``. Writes ``OUT/stability.json`` and
``OUT/stability.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import json
import os
import platform
import random
import re
import sys
import sysconfig
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PYDOC = "/usr/share/doc/python3-doc/html/_sources"
MARKDOWN = {  # file glob -> licence (from the package's copyright file)
    "/usr/share/doc/nodejs/*.md": "MIT (Node.js)",
    "/usr/share/doc/zstd/*.md.gz": "BSD-3-Clause (zstd)",
    "/usr/share/doc/libffi-dev/*.md.gz": "Expat (libffi)",
    "/usr/share/doc/openssl/*.md.gz": "Apache-2.0 (OpenSSL)",
}
KINDS = ("prose", "markdown", "chat", "code")


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read().replace("\r\n", "\n")


def chunk(text: str, source: str, min_chars: int, max_chars: int, rng: random.Random) -> list[tuple[str, str]]:
    """Documents of ``min_chars``..``max_chars`` made of whole paragraphs (cut at blank lines)."""
    paras = [p for p in re.split(r"(?<=\n)\n+", text) if p.strip()]
    out, cur, target = [], "", rng.randint(min_chars, max_chars)
    for p in paras:
        if cur and len(cur) + len(p) > target:
            if len(cur) >= min_chars:
                out.append((cur.strip("\n") + "\n", f"{source}#{len(out)}"))
            cur, target = "", rng.randint(min_chars, max_chars)
        cur += p if not cur else "\n" + p
    if len(cur) >= min_chars:
        out.append((cur.strip("\n") + "\n", f"{source}#{len(out)}"))
    return out


def corpus(args, rng: random.Random) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    """{kind: [(document, source)]} and {kind: provenance}."""
    docs: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    prov = {}
    files = sorted(p for d in ("tutorial", "howto", "faq", "library")
                   for p in glob.glob(os.path.join(PYDOC, d, "*.rst.txt")))
    for p in rng.sample(files, min(len(files), 40)):
        docs["prose"] += chunk(_read(p), os.path.relpath(p, PYDOC), args.min_chars, args.max_chars, rng)
    prov["prose"] = f"Python documentation sources, {PYDOC} (Debian python3-doc; PSF licence)"
    used = []
    for pattern, lic in MARKDOWN.items():
        for p in sorted(glob.glob(pattern)):
            text = _read(p)
            if "```" in text or "\n    " in text:
                docs["markdown"] += chunk(text, p, args.min_chars, args.max_chars, rng)
                used.append(f"{p} ({lic})")
    prov["markdown"] = "Markdown with code from /usr/share/doc: " + "; ".join(used)
    stdlib = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    for p in rng.sample(stdlib, min(len(stdlib), 40)):
        docs["code"] += chunk(_read(p), os.path.basename(p), args.min_chars, args.max_chars, rng)
    prov["code"] = f"Python {platform.python_version()} standard library .py files (PSF licence)"
    if args.locomo and os.path.isfile(args.locomo):
        with open(args.locomo) as f:
            convs = json.load(f)
        for conv in convs:
            c = conv["conversation"]
            sessions = sorted((k for k in c if re.fullmatch(r"session_\d+", k)), key=lambda k: int(k.split("_")[1]))
            text = "\n".join(f"[{c.get(k + '_date_time', '')}]\n" + "".join(f"{t['speaker']}: {t['text']}\n" for t in c[k])
                             for k in sessions)
            docs["chat"] += chunk(text, conv.get("sample_id", "locomo"), args.min_chars, args.max_chars, rng)
        prov["chat"] = "LoCoMo conversations (locomo10.json, CC BY-NC 4.0; sessions as 'Speaker: text' lines)"
    else:
        prov["chat"] = "skipped (no --locomo file)"
    return {k: v for k, v in docs.items() if v}, prov


def interior_range(method: str, doc: str, seg, rule_tokens: int, count) -> tuple[int, int] | None:
    """Char range [lo, hi] of ``doc``'s interior for the *after* version of ``method``."""
    from vllm_blockattn.segmenter.rules import rule_interior
    from vllm_blockattn.segmenter.stability import learned_interior

    if method.startswith("learned"):
        seg.config.windowing = "content"
        cands = learned_interior(seg, doc)
    else:
        cands = rule_interior(doc, rule_tokens, count)
    return (cands[0], cands[-1]) if cands else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/stability")
    ap.add_argument("--locomo", default=os.environ.get("BLOCKATTN_LOCOMO"), help="locomo10.json (chat documents)")
    ap.add_argument("--model", default=None, help="segmenter checkpoint (default: the packaged one)")
    ap.add_argument("--threshold", type=float, default=None, help="learned: cut threshold (default: the model's)")
    ap.add_argument("--docs-per-kind", type=int, default=5)
    ap.add_argument("--contexts", type=int, default=3, help="contexts per document")
    ap.add_argument("--max-docs", type=int, default=1, help="other documents at most before / after")
    ap.add_argument("--min-chars", type=int, default=3000)
    ap.add_argument("--max-chars", type=int, default=8000)
    ap.add_argument("--rule-tokens", type=int, default=256, help="rule segmenters: tokens at most per block")
    ap.add_argument("--repeats", type=int, default=3, help="throughput: best of this many runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["learned fixed", "learned content", "rule greedy", "rule content"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from vllm_blockattn.eval.benchkit import cpu_model
    from vllm_blockattn.eval.blocks import rule_based_segments
    from vllm_blockattn.segmenter.api import load_segmenter, segment_text
    from vllm_blockattn.segmenter.rules import stable_rule_segments
    from vllm_blockattn.segmenter.stability import Stability, random_contexts, spans, stability, surviving

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # token counts of long texts: no "longer than the maximum" warning
    rng = random.Random(args.seed)
    docs, provenance = corpus(args, rng)
    chosen = {k: rng.sample(v, min(args.docs_per_kind, len(v))) for k, v in docs.items()}
    pool = [d for v in docs.values() for d, _ in v]
    contexts = {src: random_contexts([d for d in pool if d != doc], args.contexts, random.Random(f"{args.seed}/{src}"),
                                     max_docs=args.max_docs)
                for v in chosen.values() for doc, src in v}
    seg = load_segmenter(args.model)
    tok = seg.tokenizer

    def count(s: str) -> int:
        return len(tok(s, add_special_tokens=False)["input_ids"])

    def segmenter(method: str):
        """The method's segment function, remembering its results (each context is cut once)."""
        memo: dict[str, list[str]] = {}
        if method.startswith("learned"):
            windowing = method.split()[1]

            def cut(t):
                seg.config.windowing = windowing
                return segment_text(t, seg, threshold=args.threshold)
        elif method == "rule greedy":
            def cut(t):
                return rule_based_segments(t, args.rule_tokens, count)
        else:
            def cut(t):
                return stable_rule_segments(t, args.rule_tokens, count)

        def remembered(t):
            if t not in memo:
                memo[t] = list(cut(t))
            return memo[t]
        return remembered

    results: dict = {}
    blocks_alone: dict = {}
    for method in args.methods:
        per_kind = {}
        t0 = time.perf_counter()
        for kind, items in chosen.items():
            total, inner = Stability(), Stability()
            n_blocks = 0
            for doc, src in items:
                fn = segmenter(method)
                alone = list(fn(doc))
                blocks_alone[(method, src)] = alone
                n_blocks += len(alone)
                res = stability(doc, fn, contexts[src], count, doc_blocks=alone)
                total.add(res)
                # interior: blocks wholly inside the after-method's interior range
                rng_in = interior_range(method, doc, seg, args.rule_tokens, count)
                if rng_in is not None:
                    lo, hi = rng_in
                    inside = [lo <= a and b <= hi for a, b in spans(alone)]
                    size = [count(b) for b in alone]
                    for prefix, suffix in contexts[src]:
                        ok = surviving(alone, list(fn(prefix + doc + suffix)), len(prefix))
                        inner.stable_tokens += sum(n for n, s, i in zip(size, ok, inside) if s and i)
                        inner.total_tokens += sum(n for n, i in zip(size, inside) if i)
            per_kind[kind] = {"stability": total.fraction, "interior_stability": inner.fraction if inner.total_tokens else None,
                              "interior_share": inner.total_tokens / total.total_tokens if total.total_tokens else 0.0,
                              "docs": len(items), "blocks_per_doc": n_blocks / max(len(items), 1),
                              "tokens_per_doc": total.total_tokens / max(len(items), 1) / max(args.contexts, 1),
                              "per_context": total.per_context}
        tot_tokens = sum(v["tokens_per_doc"] * v["docs"] for v in per_kind.values())
        results[method] = {
            "per_kind": per_kind,
            "all": sum(v["stability"] * v["tokens_per_doc"] * v["docs"] for v in per_kind.values()) / tot_tokens,
            "seconds": time.perf_counter() - t0,
        }
        print(f"{method}: stability {results[method]['all']:.3f} ({results[method]['seconds']:.0f} s)", file=sys.stderr)

    # throughput of the learned segmenter, both windowings, on every chosen document alone
    texts = [doc for v in chosen.values() for doc, _ in v]
    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(count(t) for t in texts)
    throughput = {}
    best = {"fixed": float("inf"), "content": float("inf")}
    for _ in range(args.repeats):  # interleaved, best of each: the machine's load drifts
        for windowing in best:
            seg.config.windowing = windowing
            t0 = time.perf_counter()
            for t in texts:
                seg.candidate_probs(t)
            best[windowing] = min(best[windowing], time.perf_counter() - t0)
    for windowing, secs in best.items():
        seg.config.windowing = windowing
        encs = [seg.encode(t) for t in texts]
        window_tokens = sum(int(e.attention_mask.sum()) for e in encs)
        padded = sum(seg.padded_width(int(n)) for e in encs for n in e.attention_mask.sum(-1).tolist())
        throughput[windowing] = {"seconds": secs, "chars_per_s": n_chars / secs, "tokens_per_s": n_tokens / secs,
                                 "window_tokens_per_text_token": window_tokens / max(n_tokens, 1),
                                 "padded_tokens_per_text_token": padded / max(n_tokens, 1)}
    # agreement of the two windowings' cuts on the documents alone (exact positions)
    agree = None
    if "learned fixed" in args.methods and "learned content" in args.methods:
        tp = fp = fn_ = 0
        for v in chosen.values():
            for _doc, src in v:
                a = set(spans(blocks_alone[("learned fixed", src)]))
                b = set(spans(blocks_alone[("learned content", src)]))
                ca, cb = {x for x, _ in a} - {0}, {x for x, _ in b} - {0}
                tp, fp, fn_ = tp + len(ca & cb), fp + len(cb - ca), fn_ + len(ca - cb)
        agree = 2 * tp / max(2 * tp + fp + fn_, 1)

    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads,
                    "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__},
        "command": "python eval/bench_stability.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args), "provenance": provenance,
        "segmenter": {"model": args.model or "packaged default",
                      "threshold": seg.config.threshold if args.threshold is None else args.threshold,
                      "window": seg.window, "overlap": seg.config.overlap},
        "documents": {k: [src for _, src in v] for k, v in chosen.items()},
        "results": results, "throughput": throughput, "cut_agreement_f1_fixed_vs_content": agree,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stability.json"), "w") as f:
        json.dump(out, f, indent=2)
    md = table(out)
    with open(os.path.join(args.out, "stability.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def table(out: dict) -> str:
    kinds = [k for k in KINDS if any(k in r["per_kind"] for r in out["results"].values())]
    lines = ["| method | " + " | ".join(kinds) + " | all | interior (share of tokens) | blocks/doc |",
             "|---|" + "---|" * (len(kinds) + 3)]
    for method, r in out["results"].items():
        pk = r["per_kind"]
        inner_tok = sum(v["interior_share"] * v["tokens_per_doc"] * v["docs"] for v in pk.values())
        inner_ok = sum((v["interior_stability"] or 0) * v["interior_share"] * v["tokens_per_doc"] * v["docs"]
                       for v in pk.values())
        all_tok = sum(v["tokens_per_doc"] * v["docs"] for v in pk.values())
        inner = f"{inner_ok / inner_tok:.3f} ({inner_tok / all_tok:.2f})" if inner_tok else "-"
        blocks = sum(v["blocks_per_doc"] * v["docs"] for v in pk.values()) / sum(v["docs"] for v in pk.values())
        lines.append(f"| {method} | " + " | ".join(f"{pk[k]['stability']:.3f}" if k in pk else "-" for k in kinds)
                     + f" | {r['all']:.3f} | {inner} | {blocks:.1f} |")
    tp = out["throughput"]
    lines += ["", "| learned windowing | chars/s | tokens/s | backbone tokens per text token (padded) |",
              "|---|---|---|---|"]
    for w, v in tp.items():
        lines.append(f"| {w} | {v['chars_per_s']:.0f} | {v['tokens_per_s']:.0f} | "
                     f"{v['window_tokens_per_text_token']:.2f} ({v.get('padded_tokens_per_text_token', 0):.2f}) |")
    m = out["machine"]
    lines += ["", f"{out['date']}; {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), load average "
              f"{m['load_average'][0]:.1f}; cut agreement fixed vs content (F1 of exact cut positions, documents alone): "
              f"{out['cut_agreement_f1_fixed_vs_content']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
