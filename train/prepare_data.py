"""Public QA / conversation datasets (local files) -> the distillation trainer's jsonl.

Every output line is a trainer record ``{"context": [block text, ...], "question": ..., "answer": ...}``
(train/distill.py reads it with ``dataset_format: hotpotqa``; a list of paragraphs is one block each). Long
documents are cut into blocks by the project's segmenter (``--segmenter learned``, the default: the
packaged learned segmenter, as the paper trains on segmenter-cut data; or ``paragraphs``,
``learned:<checkpoint>``, ``package.module:function``). Segmentations are cached alongside the output
(``<out>.segments.jsonl``: one line per distinct document, keyed by the SHA-256 of the segmenter spec and the
text), so a rerun, another split or another format over the same documents does not segment again.

Formats (input files are local: no download):

- ``hotpotqa``: the official JSON list (``hotpot_train_v1.1.json``, ``context`` = ``[[title, [sentences]],
  ...]``) or HF-style jsonl (``context`` = ``{"title": [...], "sentences": [...]}``). One paragraph = one
  block (``"<title>: <sentences>"``), as the paragraphs are already short; ``--segment-paragraphs`` cuts them
  with the segmenter too.
- ``2wikimultihopqa``: the official JSON list (same ``context`` layout as HotpotQA).
- ``triviaqa``: the official RC JSON (``{"Data": [{"Question", "Answer": {"Value"}, "EntityPages":
  [{"Filename"}], "SearchResults": [{"Filename"}]}]}``) with ``--evidence-dir`` (the ``evidence/`` folder),
  or HF-style jsonl (``entity_pages.wiki_context``, ``search_results.search_context``, ``answer.value``).
  Evidence documents (at most ``--max-docs``, each cut to ``--max-doc-chars``) are segmented.
- ``chatqa2``: ChatQA2-style jsonl (``messages`` user/assistant turns, the last assistant turn or
  ``answers[0]`` is the response; a long ``document`` or ``context``). The document is segmented; earlier
  turns go before the last question, as in the trainer's own ChatQA2 loader.

    python train/prepare_data.py hotpotqa --input hotpot_train_v1.1.json --out data/hotpotqa_train.jsonl \\
        --eval-out data/hotpotqa_eval.jsonl --eval-size 500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FORMATS = ("hotpotqa", "2wikimultihopqa", "triviaqa", "chatqa2")


# --- reading ------------------------------------------------------------------------------------------

def read_records(path: str) -> Iterator[tuple[str, dict]]:
    """``(where, object)`` from a JSON list, a JSON object with ``Data``/``data`` (TriviaQA), or jsonl."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        with open(path, encoding="utf-8") as f:
            for i, obj in enumerate(json.load(f)):
                yield f"{path}[{i}]", obj
        return
    if head.startswith("{"):
        first_line = head.split("\n", 1)[0]
        try:
            first = json.loads(first_line)
            is_jsonl = not (isinstance(first, dict) and isinstance(first.get("Data", first.get("data")), list))
        except json.JSONDecodeError:
            is_jsonl = False
        if not is_jsonl:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            data = obj.get("Data", obj.get("data"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: a JSON object needs a 'Data' (or 'data') list")
            for i, item in enumerate(data):
                yield f"{path}:Data[{i}]", item
            return
    from vllm_blockattn.distill.data import read_jsonl

    for lineno, obj in read_jsonl(path):
        yield f"{path}:{lineno}", obj


# --- segmentation with a cache ------------------------------------------------------------------------

class CachedSegmenter:
    """``text -> blocks`` through a segmenter spec, with a jsonl cache keyed by (spec, text)."""

    def __init__(self, spec: str, cache_path: str | None):
        from vllm_blockattn.distill.data import load_segmenter

        self.spec, self.cache_path = spec, cache_path
        self._segment: Callable[[str], list[str]] | None = None
        self._load = lambda: load_segmenter(spec)
        self.cache: dict[str, list[str]] = {}
        self.hits = self.misses = 0
        if cache_path and os.path.exists(cache_path):
            with open(cache_path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        self.cache[row["key"]] = row["blocks"]
        if cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        self._out = open(cache_path, "a", encoding="utf-8") if cache_path else None

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.spec}\0{text}".encode()).hexdigest()

    def __call__(self, text: str) -> list[str]:
        k = self.key(text)
        if k in self.cache:
            self.hits += 1
            return self.cache[k]
        self.misses += 1
        if self._segment is None:
            self._segment = self._load()
        blocks = [b for b in self._segment(text) if b.strip()]
        self.cache[k] = blocks
        if self._out:
            self._out.write(json.dumps({"key": k, "segmenter": self.spec, "blocks": blocks}) + "\n")
            self._out.flush()
        return blocks

    def close(self):
        if self._out:
            self._out.close()


# --- converters ---------------------------------------------------------------------------------------

def _need(obj: dict, key: str, where: str):
    val = obj.get(key)
    if not isinstance(val, str) or not val.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {val!r}")
    return val


def convert_multihop(obj: dict, where: str, segment, segment_paragraphs: bool) -> dict:
    """HotpotQA / 2WikiMultiHopQA: one block per paragraph (optionally cut further)."""
    ctx = obj.get("context")
    if isinstance(ctx, dict) and "title" in ctx and "sentences" in ctx:
        ctx = list(zip(ctx["title"], ctx["sentences"]))
    if not isinstance(ctx, list) or not ctx:
        raise ValueError(f"{where}: 'context' must be [[title, [sentences]], ...]")
    blocks = []
    for i, item in enumerate(ctx):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], list)):
            raise ValueError(f"{where}: context item {i} must be [title, [sentences]]")
        para = f"{item[0]}: {''.join(item[1]).strip()}\n\n"
        blocks.extend(segment(para) if segment_paragraphs else [para])
    return {"context": blocks, "question": _need(obj, "question", where), "answer": _need(obj, "answer", where)}


def _trivia_docs(obj: dict, where: str, evidence_dir: str | None) -> list[str]:
    docs = []
    if isinstance(obj.get("entity_pages"), dict):  # HF layout
        docs += [d for d in obj["entity_pages"].get("wiki_context", []) if d]
        docs += [d for d in (obj.get("search_results") or {}).get("search_context", []) if d]
        return docs
    for kind, sub in (("EntityPages", "wikipedia"), ("SearchResults", "web")):
        for page in obj.get(kind, []) or []:
            name = page.get("Filename")
            if not name:
                continue
            if evidence_dir is None:
                raise ValueError(f"{where}: official TriviaQA records need --evidence-dir")
            path = os.path.join(evidence_dir, sub, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{where}: evidence file {path} does not exist")
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
    return docs


def convert_triviaqa(obj: dict, where: str, segment, evidence_dir: str | None, max_docs: int,
                     max_doc_chars: int) -> dict | None:
    question = obj.get("Question", obj.get("question"))
    ans = obj.get("Answer", obj.get("answer"))
    answer = ans.get("Value", ans.get("value")) if isinstance(ans, dict) else ans
    if not isinstance(question, str) or not question.strip() or not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: needs a question and an answer value")
    docs = [d[:max_doc_chars] for d in _trivia_docs(obj, where, evidence_dir)[:max_docs]]
    blocks = [b for d in docs for b in segment(d)]
    if not blocks:
        return None  # no evidence: nothing to read in blocks
    return {"context": blocks, "question": question, "answer": answer}


def convert_chatqa2(obj: dict, where: str, segment) -> dict:
    from vllm_blockattn.distill.data import chatqa2_record  # the trainer's own ChatQA2 rules

    return chatqa2_record(obj, where, segment)


def convert(fmt: str, path: str, segment, args) -> Iterator[dict]:
    for where, obj in read_records(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if fmt in ("hotpotqa", "2wikimultihopqa"):
            rec = convert_multihop(obj, where, segment, args.segment_paragraphs)
        elif fmt == "triviaqa":
            rec = convert_triviaqa(obj, where, segment, args.evidence_dir, args.max_docs, args.max_doc_chars)
        elif fmt == "chatqa2":
            rec = convert_chatqa2(obj, where, segment)
        else:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        if rec is not None:
            yield rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("format", choices=FORMATS)
    ap.add_argument("--input", required=True, nargs="+", help="local input file(s)")
    ap.add_argument("--out", required=True, help="output jsonl (training split)")
    ap.add_argument("--eval-out", default=None, help="held-out jsonl (needs --eval-size)")
    ap.add_argument("--eval-size", type=int, default=0, help="records held out (seeded shuffle)")
    ap.add_argument("--segmenter", default="learned", help="learned | learned:<ckpt> | paragraphs | module:function")
    ap.add_argument("--segment-cache", default=None, help="default: <out>.segments.jsonl; 'none' disables")
    ap.add_argument("--segment-paragraphs", action="store_true", help="HotpotQA/2Wiki: cut paragraphs too")
    ap.add_argument("--evidence-dir", default=None, help="TriviaQA official: the evidence/ folder")
    ap.add_argument("--max-docs", type=int, default=4, help="TriviaQA: evidence documents per question")
    ap.add_argument("--max-doc-chars", type=int, default=8000, help="TriviaQA: characters kept per document")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many records")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if (args.eval_out is None) != (args.eval_size == 0):
        ap.error("--eval-out and --eval-size go together")
    cache = None if args.segment_cache == "none" else (args.segment_cache or args.out + ".segments.jsonl")
    segment = CachedSegmenter(args.segmenter, cache)
    records = []
    try:
        for path in args.input:
            for rec in convert(args.format, path, segment, args):
                records.append(rec)
                if args.limit and len(records) >= args.limit:
                    break
            if args.limit and len(records) >= args.limit:
                break
    finally:
        segment.close()
    held = []
    if args.eval_size:
        if args.eval_size >= len(records):
            raise SystemExit(f"--eval-size {args.eval_size} leaves no training records (have {len(records)})")
        order = list(range(len(records)))
        random.Random(args.seed).shuffle(order)
        held_idx = set(order[: args.eval_size])
        held = [r for i, r in enumerate(records) if i in held_idx]
        records = [r for i, r in enumerate(records) if i not in held_idx]
    for path, rows in ((args.out, records), (args.eval_out, held)):
        if path is None:
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    stats = {"train": len(records), "eval": len(held), "segmenter": args.segmenter, "cache": cache,
             "segmented": segment.misses, "cache_hits": segment.hits,
             "blocks_per_record": round(sum(len(r["context"]) for r in records) / max(1, len(records)), 2)}
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
