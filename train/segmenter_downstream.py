"""Downstream evidence for the segmenter, in the shape of the paper's Table 1: what each way of cutting
a context does to a block-distilled model's answers, and how much of the context a block cache serves
on multi-turn replays.

**Quality** (synthetic, so that a tiny model trained here in minutes can read it). Every context holds
8 facts ``"<name> <attribute> <value> ."`` (each attribute once, names repeat) in 4 paragraphs of
random size, hard-wrapped the way plain-text documents are (RFCs, mail, man pages): lines break every
2-5 words, often inside a fact, and a blank line ends a paragraph. The question ``"<name> <attribute>"``
asks for one value. A Qwen3-style model (2 layers x 128, word-level tokenizer) learns the task under
full attention, gets block sink tokens, and is block-distilled (``BlockDistillationTrainer``, cached
teacher, the recipe of docs/distillation.md) with one block per paragraph. Then every method cuts the
held-out contexts, and the distilled model and, for contrast, the teacher before distillation answer
under block attention: first-answer-token accuracy, its NLL, and KL(full || block) of the
first-answer distribution against the same model under full attention. Caveat, stated with the
table: a value word belongs to one attribute's vocabulary (``cat`` is a pet), so a model can find the
answer by its kind even when a cut separates it from its attribute; the measure shows what cuts cost
such a model, not a model that must bind every word to its neighbours.

**Reuse** (real text). Held-out sections of the Python documentation (Debian ``python3-doc``, PSF-2.0,
as Markdown, the segmenter's held-out pages) in two replays: *RAG* (every request retrieves
``--rag-docs`` sections by Zipf popularity, in retrieval order, joined by a blank line) and
*append-only* (a page grows by one section per turn, the whole page is the context every turn). Every
method cuts every request's context; a block is served from the cache when a block with the same
tokens was computed by an earlier request (the plugin's cache key: the block's own tokens, wherever
it sits). Stock vLLM's automatic prefix caching (APC) is the row users run today: the leading full
16-token KV pages shared with an earlier request. Tokens are the segmenter's (MiniLM WordPiece)
tokens, standing in for the served model's.

Methods: the packaged learned segmenter at its own threshold (and at lower ones); every further head
named by ``--extra-models`` at its own threshold (by default the packaged ``prose_model``); blank-line and heading cuts at their own
count; the paper's baselines (random, average, punctuation, random-candidate, average-candidate, loss
and entropy top-k from a causal LM: here the full-attention teacher for quality, none for reuse) and
blank-line/heading at the learned model's block count per text; every newline; one block; and the
gold paragraphs (quality) / the retrieved sections as blocks (reuse, what a client that sends
``documents`` gets).

    python train/segmenter_downstream.py --out runs/segmenter-downstream [--update-docs]

About 6-10 minutes on 2 CPU cores. Writes ``OUT/downstream.json`` and ``OUT/downstream.md``;
``--update-docs`` rewrites the downstream block of docs/segmenter.md and README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- segmenter-downstream:begin -->", "<!-- segmenter-downstream:end -->"
APC_PAGE = 16  # vLLM's KV page (block_size) on the CPU backend: APC shares whole pages only
K_BASELINES = ("random", "average", "punctuation", "random_candidate", "average_candidate", "blank_line", "heading",
               "loss_topk", "entropy_topk")
LABELS = {
    "gold": "gold paragraphs (one block per paragraph)", "documents": "documents as blocks (client sends `documents`)",
    "learned": "learned (packaged default)", "blank_line@natural": "blank-line, own count",
    "heading@natural": "heading, own count", "newline": "every newline", "one_block": "one block (no cuts)",
    "random": "random", "average": "average", "punctuation": "punctuation", "random_candidate": "random-candidate",
    "average_candidate": "average-candidate", "blank_line": "blank-line", "heading": "heading",
    "apc": "stock vLLM, automatic prefix caching (full attention)", "loss_topk": "loss top-k (teacher LM)", "entropy_topk": "entropy top-k (teacher LM)",
}


# --- the quality task -----------------------------------------------------------------------------

def wrapped_fact_records(n: int, *, paragraphs: int = 4, facts: int = 8, names: int = 6,
                         wrap: tuple[int, int] = (2, 5), seed: int = 0) -> list[dict]:
    """Hard-wrapped fact paragraphs: ``{"paragraphs": [...], "text", "question", "answer"}``.

    Every fact ``"<name> <attribute> <value> ."`` has its own attribute (the attribute identifies the
    fact, as in ``train/demo_cpu.py``), names repeat; the ``facts`` facts fall into ``paragraphs``
    paragraphs of random size (at least one fact each); lines hold ``wrap`` words (a value keeps its
    period), paragraphs end with a blank line. ``text`` is the paragraphs joined; the gold blocks are
    the paragraphs.
    """
    from vllm_blockattn.distill.data import ATTRIBUTES, NAMES

    n_facts = facts
    if n_facts > len(ATTRIBUTES):
        raise ValueError(f"at most {len(ATTRIBUTES)} facts per context (one per attribute), got {n_facts}")
    if not 1 <= paragraphs <= n_facts:
        raise ValueError(f"paragraphs must be in [1, {n_facts}] (each holds a fact), got {paragraphs}")
    rng = random.Random(seed)
    pool = NAMES[:names]
    out = []
    for _ in range(n):
        facts = [(rng.choice(pool), a, rng.choice(ATTRIBUTES[a])) for a in rng.sample(list(ATTRIBUTES), n_facts)]
        bounds = [0, *sorted(rng.sample(range(1, n_facts), paragraphs - 1)), n_facts]  # paragraphs of 1+ facts
        paras = []
        for lo, hi in zip(bounds, bounds[1:]):
            words = [w for nm, a, v in facts[lo:hi] for w in (nm, a, v + " .")]
            lines, i = [], 0
            while i < len(words):
                w = rng.randint(*wrap)
                lines.append(" ".join(words[i:i + w]))
                i += w
            paras.append("\n".join(lines) + "\n\n")
        name, attr, value = rng.choice(facts)
        out.append({"paragraphs": paras, "text": "".join(paras), "question": f"{name} {attr}", "answer": value})
    return out


def facts_cut(text: str, cuts) -> tuple[int, int]:
    """(facts with a block boundary between their attribute and value, facts): the cuts that cost an answer."""
    import re

    bad = total = 0
    cut_set = sorted(cuts)
    for m in re.finditer(r"(\S+)\s+(\S+)\s+(\S+) \.", text):
        total += 1
        a_end, v_start = m.end(2), m.start(3)
        bad += any(a_end < c <= v_start for c in cut_set)
    return bad, total


# --- methods --------------------------------------------------------------------------------------

def method_cuts(texts, learned: dict, counts, *, tokenizer, scorer=None, seed: int = 0) -> dict[str, list]:
    """{method: [cuts per text]}: ``learned`` ({row name: cuts per text}), one block, every newline,
    blank-line and heading cuts at their own count, and the paper's baselines at ``counts[i]`` blocks
    for text i (the loss/entropy ones only with a ``scorer``)."""
    from vllm_blockattn.segmenter.baselines import baseline_blocks, natural_blocks
    from vllm_blockattn.segmenter.candidates import SegmenterInputError, cuts_of, find_candidates

    out = {**learned, "one_block": [[] for _ in texts], "newline": [find_candidates(t) for t in texts]}
    for name in ("blank_line", "heading"):
        out[f"{name}@natural"] = [cuts_of(natural_blocks(name, t)) for t in texts]
    for name in K_BASELINES:
        if name in ("loss_topk", "entropy_topk") and scorer is None:
            continue
        rows = []
        for i, (t, k) in enumerate(zip(texts, counts)):
            try:
                rows.append(cuts_of(baseline_blocks(name, t, k, tokenizer=tokenizer, scorer=scorer, seed=seed + i)))
            except SegmenterInputError:  # fewer cut positions than k
                rows.append(cuts_of(baseline_blocks(name, t, 1, tokenizer=tokenizer, scorer=scorer)))
        out[name] = rows
    return out


def learned_rows(texts, seg, thresholds) -> dict[str, list]:
    """{"learned@TH": cuts per text} for every threshold (the first is the checkpoint's own)."""
    from vllm_blockattn.segmenter.api import segment_cuts_thresholds

    return {f"learned@{th:g}": cuts for th, cuts in segment_cuts_thresholds(texts, seg, thresholds).items()}


def extra_rows(texts, extra: dict) -> dict[str, list]:
    """{"NAME@TH": cuts per text} for every extra head ``{NAME: Segmenter}``, each at its own threshold."""
    from vllm_blockattn.segmenter.api import segment_cuts_thresholds

    out = {}
    for name, seg in extra.items():
        th = seg.config.threshold
        out[f"{name}@{th:g}"] = segment_cuts_thresholds(texts, seg, [th])[th]
    return out


def label(method: str, own: float, extra: dict | None = None) -> str:
    name = method.split("@")[0]
    if extra and name in extra:
        return f"learned, `{name}` head, threshold {float(method.split('@')[1]):g} (its own)"
    if method.startswith("learned@"):
        th = float(method.split("@")[1])
        return f"learned, threshold {th:g}" + (" (packaged default)" if th == own else "")
    return LABELS[method]


# --- reuse replay ---------------------------------------------------------------------------------

def block_reuse(contexts, cuts_per_context, tokenize) -> tuple[int, int]:
    """(context tokens served from a block cache keyed by each block's own tokens, context tokens),
    over a replay in order; a block enters the cache once its request has run. Blocks tokenize alone
    (the plugin tokenizes each block between sink groups)."""
    from vllm_blockattn.segmenter.candidates import split_at

    cache: set[tuple] = set()
    hit = total = 0
    for text, cuts in zip(contexts, cuts_per_context):
        keys = [tuple(tokenize(b)) for b in split_at(text, cuts)]
        for key in keys:
            total += len(key)
            hit += len(key) if key in cache else 0
        cache.update(keys)
    return hit, total


def prefix_reuse(contexts, tokenize, page: int = APC_PAGE) -> tuple[int, int]:
    """(tokens served by automatic prefix caching, tokens): the leading whole ``page``-token pages
    that an earlier request already computed (vLLM hashes each full page with everything before it)."""
    seen: set[tuple] = set()
    hit = total = 0
    for text in contexts:
        ids = tuple(tokenize(text))
        total += len(ids)
        full = len(ids) // page
        j = 0
        while j < full and ids[: (j + 1) * page] in seen:
            j += 1
        hit += j * page
        seen.update(ids[: (i + 1) * page] for i in range(full))
    return hit, total


def rag_replay(sections: list[str], n: int, k: int, seed: int, zipf: float = 1.1) -> list[list[int]]:
    """Section indices per request: ``k`` distinct sections drawn by Zipf popularity, in retrieval order."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) ** zipf for r in range(len(sections))]
    order = list(range(len(sections)))
    rng.shuffle(order)  # popularity independent of page order
    reqs = []
    for _ in range(n):
        pick: list[int] = []
        while len(pick) < min(k, len(sections)):
            j = rng.choices(order, weights=weights)[0]
            if j not in pick:
                pick.append(j)
        reqs.append(pick)
    return reqs


# --- report ---------------------------------------------------------------------------------------

def _pct(x):
    return "" if x is None else f"{100 * x:.1f}%"


def render(summary: dict) -> str:
    q, r, meta = summary["quality"], summary["reuse"], summary["meta"]
    own = meta["thresholds"][0]
    extra = meta.get("extra_models", {})
    out = [f"Measured {meta['date']} by `python train/segmenter_downstream.py` (commit {meta['commit']}, seed "
           f"{meta['seed']}, {meta['cpu']}, {meta['minutes']:.0f} min wall).", ""]
    out += [f"Block-attention quality: a Qwen3-style model ({q['model']}) trained here under full attention "
            f"to {_pct(q['teacher_full'])}, then block-distilled for {q['student_steps']} steps with one block per "
            f"paragraph; {q['n']} held-out hard-wrapped fact contexts ({q['paragraphs']} paragraphs, "
            f"{q['facts']} facts), each cut by every method; the paper's baselines cut into the gold paragraph "
            "count. \"facts cut\": share of facts with a block boundary between attribute and value. Answer "
            "columns: first-answer-token accuracy (greedy) / its NLL (nats) / KL(full || block) of the "
            "first-answer distribution against the same model under full attention (mean over contexts). "
            f"The distilled model under full attention: {_pct(q['student_full'])}. A value names its "
            "attribute's kind (`cat` is a pet), so a model can find it even when a cut parts it from its "
            "attribute.", ""]
    out += ["| method | blocks/text | boundary F1 vs paragraphs | facts cut | distilled: accuracy / NLL / KL | "
            "teacher, not distilled: accuracy / NLL / KL |", "|---|---|---|---|---|---|"]

    def stats(x):
        return f"{_pct(x['acc'])} / {x['nll']:.3f} / {x['kl']:.3f}"

    for m in q["rows"]:
        out.append(f"| {label(m['method'], own, extra)} | {m['blocks']:.1f} | {m['f1']:.3f} | {_pct(m['facts_cut'])} | "
                   f"{stats(m['student'])} | {stats(m['teacher'])} |")
    names = r["replays"]
    out += ["", f"Block-cache reuse on real text (held-out pages of the Python documentation, {r['source']}): share "
            "of context tokens served from the cache over each replay (a block is served when an earlier "
            "request computed a block of the same tokens; APC: leading whole 16-token pages), and blocks "
            "per request in brackets; the paper's baselines cut into the documents' count. RAG: "
            f"{meta['args']['rag_requests']} requests, each {meta['args']['rag_docs']} sections drawn by Zipf "
            "popularity from a pool of held-out sections, joined by a blank line; append-only: held-out pages "
            "growing by one section per turn, the whole page the context every turn. "
            + "; ".join(f"{n}: {r['info'][n]['requests']} requests, {r['info'][n]['tokens']:.0f} tokens per context"
                        for n in names) + ".", ""]
    out += ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in r["rows"]:
        out.append(f"| {label(m['method'], own, extra)} | " + " | ".join(f"{_pct(m[n][0])} ({m[n][1]:.1f})" for n in names) + " |")
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------------

def quality(a, seg, thresholds, extra=None) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from demo_cpu import accuracy, build_word_tokenizer, train_student, train_teacher
    from vllm_blockattn.distill.data import BlockDataCollator, ChatBlockFormatter
    from vllm_blockattn.distill.sinks import add_sink_token
    from vllm_blockattn.core.layout import BlockSettings
    from vllm_blockattn.segmenter.baselines import LMScorer
    from vllm_blockattn.segmenter.candidates import cuts_of, split_at
    from vllm_blockattn.segmenter.metrics import evaluate
    from vllm_blockattn.tiny import build_config

    tokenizer = build_word_tokenizer()
    sink_id = len(tokenizer)
    settings = BlockSettings(sink_token_id=sink_id, num_sinks=4)
    config = build_config("qwen3", vocab_size=sink_id + 1, hidden_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    recs = wrapped_fact_records(a.train_samples + a.eval_samples, paragraphs=a.paragraphs, seed=a.seed)
    fmt = ChatBlockFormatter(tokenizer, settings)
    as_blocks = [{"context": r["paragraphs"], "question": r["question"], "answer": r["answer"]} for r in recs]
    samples = [fmt(r) for r in as_blocks]
    train, held = samples[: a.train_samples], samples[a.train_samples:]
    test = recs[a.train_samples:]
    collator = BlockDataCollator(tokenizer.pad_token_id, settings)
    steps, _ = train_teacher(model, train, held, collator, settings, steps=a.teacher_steps, batch_size=64,
                             lr=3e-3, target=0.995, seed=a.seed)
    teacher_full = accuracy(model, held, collator, settings, block=False)
    scorer = LMScorer(model, tokenizer, window=256, overlap=32)  # the teacher as the LM baselines' causal LM
    texts = [r["text"] for r in test]
    gold = [cuts_of(r["paragraphs"]) for r in test]
    print(f"segmenting {len(texts)} held-out contexts with the learned segmenter ...", flush=True)
    cuts = {"gold": gold, **method_cuts(texts, {**learned_rows(texts, seg, thresholds), **extra_rows(texts, extra or {})},
                                        [len(g) + 1 for g in gold],
                                        tokenizer=tokenizer, scorer=scorer, seed=a.seed)}
    added = add_sink_token(tokenizer, model, num_sinks=4, init="mean")
    if added != settings:
        raise RuntimeError(f"sink token got id {added.sink_token_id}, expected {sink_id}")
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _timer = train_student("distill", model, tokenizer, Dataset.from_list(train[: a.student_samples]),
                                        steps=a.student_steps, batch_size=64, lr=1e-3, out=tmp, seed=a.seed,
                                        teacher_cache=True)
    student = trainer.model
    rows = []
    for name, per_text in cuts.items():
        data = [fmt({"context": split_at(r["text"], c), "question": r["question"], "answer": r["answer"]})
                for r, c in zip(test, per_text)]
        bad = [facts_cut(t, c) for t, c in zip(texts, per_text)]
        f1 = evaluate([("all", c, g, len(t)) for t, c, g in zip(texts, per_text, gold)])["all"]["f1"]
        rows.append({"method": name, "blocks": sum(len(c) + 1 for c in per_text) / len(texts), "f1": f1,
                     "facts_cut": sum(b for b, _ in bad) / sum(n for _, n in bad),
                     "student": answer_stats(student, data, collator, settings),
                     "teacher": answer_stats(model, data, collator, settings)})
        print(f"  {name}: {rows[-1]}", flush=True)
    return {"rows": rows, "n": len(test), "paragraphs": a.paragraphs, "facts": 8,
            "model": "2 layers x 128, word-level tokenizer", "teacher_steps": steps, "teacher_full": teacher_full,
            "student_steps": a.student_steps, "student_full": accuracy(student, held, collator, settings, block=False)}


def answer_stats(model, data, collator, settings) -> dict:
    """Block attention on ``data`` against the same model under full attention: first-answer-token
    accuracy, its NLL (nats) and KL(full || block) of the first-answer distribution, means over samples."""
    import torch

    from demo_cpu import first_answer_logits

    acc = nll = kl = 0.0
    n = 0
    full = first_answer_logits(model, data, collator, settings, block=False)
    for (lb, gold), (lf, gold_f) in zip(first_answer_logits(model, data, collator, settings, block=True), full):
        if not torch.equal(gold, gold_f):
            raise RuntimeError("block and full batches disagree on the answer token")
        pb, pf = torch.log_softmax(lb, -1), torch.log_softmax(lf, -1)
        acc += (lb.argmax(-1) == gold).sum().item()
        nll += -pb.gather(1, gold[:, None]).sum().item()
        kl += (pf.exp() * (pf - pb)).sum().item()
        n += gold.shape[0]
    return {"acc": acc / n, "nll": nll / n, "kl": kl / n}


def held_out_pages(style: str, section_chars: tuple[int, int]) -> tuple[list[list[str]], str]:
    """Sections of the segmenter evidence's held-out Python documentation pages (``library/``), in
    ``style`` (``md``: Markdown with headings; ``prose``: headings removed), and the package version."""
    import glob

    from segmenter_demo import PYDOC, held_out

    from vllm_blockattn.segmenter.corpora import deb_version, rst_document

    version = deb_version("python3-doc")
    if version == "not-installed" or not os.path.isdir(PYDOC):
        raise SystemExit("python3-doc is not installed: run train/segmenter_evidence.sh (or apt-get install python3-doc)")
    pages = []
    for p in sorted(glob.glob(os.path.join(PYDOC, "library", "*.rst.txt"))):
        rel = "python3-doc:" + os.path.relpath(p, PYDOC)
        if not held_out(rel, 0.25):  # the segmenter evidence's held-out pages only
            continue
        doc = rst_document(open(p, encoding="utf-8").read(), rel, style=style)
        secs = [s for s in (doc.sections if doc else []) if section_chars[0] <= len(s) <= section_chars[1]]
        if len(secs) >= 4:
            pages.append(secs)
    return pages, version


def reuse(a, seg, thresholds, extra=None) -> dict:
    from vllm_blockattn.segmenter.candidates import cuts_of

    tok = seg.tokenizer

    def tokenize(s):
        return tok(s, add_special_tokens=False, verbose=False)["input_ids"]

    replays, info = {}, {}
    for style, kind in (("md", "Markdown"), ("prose", "prose")):
        pages, version = held_out_pages(style, tuple(a.section_chars))
        random.Random(a.seed).shuffle(pages)
        pool = [s for secs in pages[: a.rag_pool_pages] for s in secs]
        grow = pages[a.rag_pool_pages: a.rag_pool_pages + a.append_pages]
        replays[f"RAG, {kind}"] = [[pool[j] + "\n\n" for j in req]
                                   for req in rag_replay(pool, a.rag_requests, a.rag_docs, a.seed)]
        replays[f"append-only, {kind}"] = [[s + "\n\n" for s in secs[:t]] for secs in grow
                                          for t in range(1, min(len(secs), a.append_turns) + 1)]
        info[kind] = {"pool_sections": len(pool), "append_pages": len(grow)}
    rows: dict[str, dict] = {}
    for name, docs in replays.items():
        ctx = ["".join(d) for d in docs]
        print(f"{name}: segmenting {len(ctx)} contexts with the learned segmenter ...", flush=True)
        cuts = {"documents": [cuts_of(d) for d in docs],
                **method_cuts(ctx, {**learned_rows(ctx, seg, thresholds), **extra_rows(ctx, extra or {})},
                              [len(d) for d in docs], tokenizer=tok,
                              seed=a.seed)}
        for method, c in cuts.items():
            hit, total = block_reuse(ctx, c, tokenize)
            rows.setdefault(method, {"method": method})[name] = (hit / total, sum(len(x) + 1 for x in c) / len(ctx))
        hit, total = prefix_reuse(ctx, tokenize)
        rows.setdefault("apc", {"method": "apc"})[name] = (hit / total, 1.0)
        info[name] = {"requests": len(ctx), "tokens": total / len(ctx)}
    return {"rows": list(rows.values()), "replays": list(replays), "info": info,
            "source": f"python3-doc {version}, PSF-2.0"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/segmenter-downstream")
    ap.add_argument("--model", default=None, help="segmenter checkpoint (default: the packaged one)")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.5, 0.3, 0.1],
                    help="learned-segmenter rows besides the checkpoint's own threshold (lower: more blocks)")
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--paragraphs", type=int, default=4)
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--student-samples", type=int, default=6400)
    ap.add_argument("--rag-requests", type=int, default=40)
    ap.add_argument("--rag-docs", type=int, default=3)
    ap.add_argument("--rag-pool-pages", type=int, default=6)
    ap.add_argument("--append-pages", type=int, default=6)
    ap.add_argument("--append-turns", type=int, default=8)
    ap.add_argument("--section-chars", type=int, nargs=2, default=(200, 2500))
    ap.add_argument("--extra-models", nargs="*", default=["prose_model=pkg:vllm_blockattn.segmenter/prose_model"],
                    metavar="NAME=REF", help="further segmenter heads, each a row at its own threshold (a reference "
                    "as --model takes; default: the packaged prose_model; none: give the option without values)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true", help="reuse replays only (prints JSON)")
    ap.add_argument("--from-json", default=None, help="render a saved OUT/downstream.json instead of measuring")
    ap.add_argument("--update-docs", action="store_true", help="rewrite the downstream blocks of docs/segmenter.md and README.md")
    a = ap.parse_args(argv)
    extra_refs = {}
    for e in a.extra_models:
        name, sep, ref = e.partition("=")
        if not sep or not name or not ref or "@" in name or name in LABELS or name.startswith("learned"):
            raise SystemExit(f"--extra-models takes NAME=REF with a new row name, got {e!r}")
        extra_refs[name] = ref

    import torch

    from segmenter_demo import git_commit, update_docs
    from vllm_blockattn.eval.benchkit import cpu_model
    from vllm_blockattn.segmenter.api import load_segmenter, thresholds_for

    if a.from_json:
        with open(a.from_json) as f:
            block = render(json.load(f))
        print(block)
        if a.update_docs:
            print("updated:", ", ".join(update_docs(block, BEGIN, END)) or "nothing")
        return
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.monotonic()
    seg = load_segmenter(a.model)
    thresholds = [seg.config.threshold] + [t for t in a.thresholds if t != seg.config.threshold]
    for t in thresholds:
        thresholds_for(t, 1)  # validated
    extra = {name: load_segmenter(ref) for name, ref in extra_refs.items()}
    summary = {"reuse": reuse(a, seg, thresholds, extra)}
    summary["quality"] = None if a.skip_quality else quality(a, seg, thresholds, extra)
    summary["meta"] = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "seed": a.seed,
                       "cpu": cpu_model(), "minutes": (time.monotonic() - t0) / 60,
                       "thresholds": thresholds, "extra_models": extra_refs, "args": vars(a)}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "downstream.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if summary["quality"] is None:
        print(json.dumps(summary["reuse"], indent=1))
        return
    block = render(summary)
    with open(os.path.join(a.out, "downstream.md"), "w") as f:
        f.write(block + "\n")
    print(block)
    if a.update_docs:
        print("updated:", ", ".join(update_docs(block, BEGIN, END)) or "nothing")


if __name__ == "__main__":
    main()
