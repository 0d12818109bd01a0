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

``mix`` draws several sources by weight into one file, as the paper's recipe mixes HotpotQA with a
segmenter-cut ChatQA2 subset. Every source is a format above with its own files (``--source NAME PATH
...``, NAME a format); ``--mix`` gives relative weights (``hotpotqa=0.7,chatqa2=0.3`` = ``7,3``): with
``--size N`` exactly N training records, each source's count its share by largest remainder, and the
``--eval-size`` held-out records split the same way (never a record of the training split). Each source's
records are drawn in a seeded random order and converted (segmented) only when drawn, so a large source
costs no segmentation beyond what the mix takes. Without ``--size``: the most records the sources hold at
the weights without repeating one (``datasets.interleave_datasets``' ``first_exhausted``, with exact
counts); a source with too few records is an error naming it, or with ``--oversample`` its training
records repeat (``all_exhausted``). Mixed records carry ``"source"``; the training order is shuffled.
``--max-chars`` skips records longer than that (the trainer would cut their trailing blocks, perhaps the
one holding the answer). Options can come from a YAML file (``--config``; keys as the options, ``source``
a mapping ``{name: [files]}``), e.g. train/configs/data_hotpotqa_chatqa2.yaml:

    python train/prepare_data.py mix --source hotpotqa hotpot_train_v1.1.json \\
        --source chatqa2 chatqa2_long_sft.jsonl --mix hotpotqa=0.5,chatqa2=0.5 --size 20000 \\
        --out data/mix_train.jsonl --eval-out data/mix_eval.jsonl --eval-size 500
    python train/prepare_data.py --config train/configs/data_hotpotqa_chatqa2.yaml
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


def convert_one(fmt: str, obj, where: str, segment, args) -> dict | None:
    """One input object -> a trainer record (None: nothing to read in blocks, or over ``--max-chars``)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    max_chars = getattr(args, "max_chars", None)
    if fmt in ("hotpotqa", "2wikimultihopqa"):
        rec = convert_multihop(obj, where, segment, args.segment_paragraphs)
    elif fmt == "triviaqa":
        rec = convert_triviaqa(obj, where, segment, args.evidence_dir, args.max_docs, args.max_doc_chars)
    elif fmt == "chatqa2":
        doc = obj.get("document", obj.get("context"))
        if max_chars and isinstance(doc, str) and len(doc) > max_chars:
            return None  # too long anyway: not worth segmenting
        rec = convert_chatqa2(obj, where, segment)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if rec is not None and max_chars and record_chars(rec) > max_chars:
        return None
    return rec


def record_chars(rec: dict) -> int:
    return sum(map(len, rec["context"])) + len(rec["question"]) + len(rec["answer"])


def convert(fmt: str, path: str, segment, args) -> Iterator[dict]:
    for where, obj in read_records(path):
        rec = convert_one(fmt, obj, where, segment, args)
        if rec is not None:
            yield rec


# --- mixing sources -----------------------------------------------------------------------------------

def parse_mix(spec) -> dict[str, float]:
    """``"hotpotqa=0.7,chatqa2=0.3"`` (or the same as a mapping) -> ``{name: weight}``. Weights are relative
    (``7,3`` is ``0.7,0.3``): each source's share of the records is its weight over the sum."""
    import math

    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str) and spec.strip():
        items = []
        for part in spec.split(","):
            name, eq, value = part.partition("=")
            if not eq or not name.strip() or not value.strip():
                raise ValueError(f"--mix: {part.strip()!r} is not NAME=WEIGHT (e.g. hotpotqa=0.7,chatqa2=0.3)")
            items.append((name.strip(), value.strip()))
    else:
        raise ValueError(f"--mix must be NAME=WEIGHT,... (e.g. hotpotqa=0.7,chatqa2=0.3), got {spec!r}")
    weights: dict[str, float] = {}
    for name, value in items:
        if name in weights:
            raise ValueError(f"--mix: source {name!r} is given twice")
        if name not in FORMATS:
            raise ValueError(f"--mix: unknown source {name!r}; sources are the formats {FORMATS}")
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--mix: the weight of {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"--mix: the weight of {name!r} must be a positive number, got {value!r}")
        weights[name] = w
    if len(weights) < 2:
        raise ValueError(f"--mix needs at least two sources (one source: run its format directly), got {spec!r}")
    return weights


def parse_sources(value) -> dict[str, list[str]]:
    """``--source NAME PATH [PATH ...]`` (repeated) or a mapping ``{name: path or [paths]}`` -> ``{name: [paths]}``."""
    items = list(value.items()) if isinstance(value, dict) else [(v[0], v[1:]) for v in (value or [])]
    out: dict[str, list[str]] = {}
    for name, paths in items:
        paths = [paths] if isinstance(paths, str) else list(paths or [])
        if name not in FORMATS:
            raise ValueError(f"--source: unknown source {name!r}; sources are the formats {FORMATS}")
        if name in out:
            raise ValueError(f"--source: source {name!r} is given twice (give all its files at once)")
        if not paths:
            raise ValueError(f"--source {name}: no input file")
        out[name] = [str(p) for p in paths]
    return out


def quotas(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` records by the weights (largest remainder: the counts sum to ``total`` and each is
    within one record of its exact share)."""
    z = sum(weights.values())
    exact = {k: total * w / z for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: (-(exact[k] - out[k]), list(weights).index(k)))
    for k in order[: total - sum(out.values())]:
        out[k] += 1
    return out


class _Source:
    """A source's records in a seeded random order, converted (and segmented) only when drawn."""

    def __init__(self, name: str, paths: list[str], seed: int, segment, args):
        self.name, self.segment, self.args = name, segment, args
        self.raw = [wo for p in paths for wo in read_records(p)]
        if not self.raw:
            raise ValueError(f"source {name!r}: no records in {paths}")
        self.order = list(range(len(self.raw)))
        random.Random(f"{seed}:{name}").shuffle(self.order)
        self.pos, self.skipped = 0, 0

    def take(self, n: int | None) -> list[dict]:
        """The next ``n`` usable records (all that are left when ``n`` is None)."""
        out = []
        while (n is None or len(out) < n) and self.pos < len(self.order):
            where, obj = self.raw[self.order[self.pos]]
            self.pos += 1
            rec = convert_one(self.name, obj, where, self.segment, self.args)
            if rec is None:
                self.skipped += 1
                continue
            out.append({**rec, "source": self.name})
        return out


def check_mix(sources: dict[str, list[str]], weights: dict[str, float], size: int | None):
    if set(sources) != set(weights):
        missing = sorted(set(weights) - set(sources))
        extra = sorted(set(sources) - set(weights))
        raise ValueError("--mix and --source must name the same sources"
                         + (f"; no --source for {missing}" if missing else "")
                         + (f"; no --mix weight for {extra}" if extra else ""))
    if size is not None and size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")


def mix_records(sources: dict[str, list[str]], weights: dict[str, float], segment, args,
                size: int | None, eval_size: int, seed: int, oversample: bool) -> tuple[list[dict], list[dict], dict]:
    """Draw ``size`` training and ``eval_size`` held-out records from the sources in the proportions of
    ``weights`` (both splits are split by the weights: largest remainder), each source's records in a
    seeded random order; the two splits never share a record. ``size`` None: the largest mix the sources
    hold without repeating a record (like ``datasets.interleave_datasets(..., stopping_strategy=
    "first_exhausted")`` with exact counts). A source with too few records is an error unless
    ``oversample`` (its training records are then repeated, like ``"all_exhausted"``)."""
    check_mix(sources, weights, size)
    streams = {k: _Source(k, sources[k], seed, segment, args) for k in weights}
    held_q = quotas(eval_size, weights)
    pools: dict[str, list[dict]] = {}
    if size is None:  # every usable record, then the largest size the weights allow
        pools = {k: s.take(None) for k, s in streams.items()}
        z = sum(weights.values())
        total = min(int(len(pools[k]) * z / w + 1e-9) for k, w in weights.items())
        size = total - eval_size
        while size > 0 and any(quotas(size, weights)[k] + held_q[k] > len(pools[k]) for k in weights):
            size -= 1
        if size < 1:
            have = {k: len(v) for k, v in pools.items()}
            raise ValueError(f"the sources hold too few usable records for the mix: {have}")
    train_q = quotas(size, weights)
    need = {k: train_q[k] + held_q[k] for k in weights}
    for k, s in streams.items():
        if k not in pools:
            pools[k] = s.take(need[k])
    short = [f"source {k!r} has {len(pools[k])} usable records (of {len(streams[k].raw)}; {streams[k].skipped} "
             f"skipped), the mix asks for {need[k]} ({train_q[k]} train + {held_q[k]} eval: weight {weights[k]:g} "
             f"of {sum(weights.values()):g})" for k in weights
             if len(pools[k]) < need[k] and (not oversample or len(pools[k]) <= held_q[k])]
    if short:
        raise ValueError("; ".join(short) + ". Lower --size, change the weights, or --oversample to repeat a short "
                         "source's training records")
    train, held, per_source = [], [], {}
    for k, s in streams.items():
        pool = pools[k]
        h, rest = pool[: held_q[k]], pool[held_q[k]: need[k]]
        t = [rest[i % len(rest)] for i in range(train_q[k])]  # repeats only when oversampling
        held += h
        train += t
        per_source[k] = {"train": len(t), "eval": len(h), "unique_train": len(rest), "skipped": s.skipped,
                         "blocks_per_record": round(sum(len(r["context"]) for r in t) / max(1, len(t)), 2)}
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held, per_source


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("format", nargs="?", choices=FORMATS + ("mix",),
                    help="a dataset format, or 'mix' (several sources by weight: --source, --mix)")
    ap.add_argument("--config", default=None,
                    help="YAML whose keys are these options (format, source: {name: [files]}, mix: {name: weight}, "
                         "size, out, ...); the command line overrides it")
    ap.add_argument("--input", nargs="+", help="local input file(s)")
    ap.add_argument("--source", nargs="+", action="append", metavar=("NAME", "PATH"),
                    help="mix: a source (a format name) and its local file(s); repeat per source")
    ap.add_argument("--mix", default=None, help="mix: relative weights, e.g. hotpotqa=0.7,chatqa2=0.3")
    ap.add_argument("--size", type=int, default=None,
                    help="mix: training records (default: the most the sources hold at the weights without repeats)")
    ap.add_argument("--oversample", action="store_true",
                    help="mix: repeat a short source's training records instead of failing")
    ap.add_argument("--out", help="output jsonl (training split)")
    ap.add_argument("--eval-out", default=None, help="held-out jsonl (needs --eval-size)")
    ap.add_argument("--eval-size", type=int, default=0, help="records held out (seeded shuffle; mix: split by weight)")
    ap.add_argument("--segmenter", default="learned", help="learned | learned:<ckpt> | paragraphs | module:function")
    ap.add_argument("--segment-cache", default=None, help="default: <out>.segments.jsonl; 'none' disables")
    ap.add_argument("--segment-paragraphs", action="store_true", help="HotpotQA/2Wiki: cut paragraphs too")
    ap.add_argument("--evidence-dir", default=None, help="TriviaQA official: the evidence/ folder")
    ap.add_argument("--max-docs", type=int, default=4, help="TriviaQA: evidence documents per question")
    ap.add_argument("--max-doc-chars", type=int, default=8000, help="TriviaQA: characters kept per document")
    ap.add_argument("--max-chars", type=int, default=None,
                    help="skip records longer than this (context + question + answer characters)")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many records (not with mix)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            ap.error("--config needs a file")
        import yaml

        with open(argv[i + 1], encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            ap.error(f"--config {argv[i + 1]}: expected a YAML mapping")
        known = {a.dest for a in ap._actions}
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        unknown = sorted(set(cfg) - known - {"config"})
        if unknown:
            ap.error(f"--config {argv[i + 1]}: unknown keys {unknown}")
        if "input" in cfg and isinstance(cfg["input"], str):
            cfg["input"] = [cfg["input"]]
        cfg_sources = cfg.pop("source", None)  # --source on the command line replaces the file's sources
        ap.set_defaults(**cfg)
    else:
        cfg_sources = None
    args = ap.parse_args(argv)
    if args.source is None:
        args.source = cfg_sources
    if args.format is None:
        ap.error("the format (or 'mix') is required, on the command line or as 'format' in --config")
    if args.out is None:
        ap.error("--out is required")
    if (args.eval_out is None) != (args.eval_size == 0):
        ap.error("--eval-out and --eval-size go together")
    if args.format == "mix":
        if args.input:
            ap.error("mix reads --source NAME PATH ... (one per source), not --input")
        if not args.source or not args.mix:
            ap.error("mix needs --source NAME PATH ... for every source and --mix NAME=WEIGHT,...")
        if args.limit:
            ap.error("mix: use --size, not --limit")
    else:
        if not args.input:
            ap.error(f"{args.format} needs --input")
        if args.source or args.mix or args.size is not None or args.oversample:
            ap.error(f"--source/--mix/--size/--oversample are for 'mix', not {args.format!r}")
    return args


def _write(path: str | None, rows: list[dict]):
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    cache = None if args.segment_cache == "none" else (args.segment_cache or args.out + ".segments.jsonl")
    if args.format == "mix":  # validate before loading a segmenter or reading a file
        weights, sources = parse_mix(args.mix), parse_sources(args.source)
        check_mix(sources, weights, args.size)
    segment = CachedSegmenter(args.segmenter, cache)
    records, held, per_source = [], [], None
    try:
        if args.format == "mix":
            records, held, per_source = mix_records(sources, weights, segment, args, args.size, args.eval_size,
                                                    args.seed, args.oversample)
        else:
            for path in args.input:
                for rec in convert(args.format, path, segment, args):
                    records.append(rec)
                    if args.limit and len(records) >= args.limit:
                        break
                if args.limit and len(records) >= args.limit:
                    break
    finally:
        segment.close()
    if args.eval_size and args.format != "mix":
        if args.eval_size >= len(records):
            raise SystemExit(f"--eval-size {args.eval_size} leaves no training records (have {len(records)})")
        order = list(range(len(records)))
        random.Random(args.seed).shuffle(order)
        held_idx = set(order[: args.eval_size])
        held = [r for i, r in enumerate(records) if i in held_idx]
        records = [r for i, r in enumerate(records) if i not in held_idx]
    _write(args.out, records)
    _write(args.eval_out, held)
    stats = {"train": len(records), "eval": len(held), "segmenter": args.segmenter, "cache": cache,
             "segmented": segment.misses, "cache_hits": segment.hits,
             "blocks_per_record": round(sum(len(r["context"]) for r in records) / max(1, len(records)), 2)}
    if per_source is not None:
        stats["sources"] = per_source
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input or a bad mix: the message, without a traceback
        sys.exit(f"prepare_data.py: error: {e}")
