"""SemanticSeg-format data: the record format, and two builders.

A record (one JSON object per line)::

    {"text": "...", "candidates": [12, 40, ...], "labels": [0, 1, ...], "category": "code",
     "id": "optional", "source": "optional"}

``candidates`` are char offsets of candidate cuts (sorted, unique, strictly inside the text; a new block
would start at ``text[c]``), ``labels`` holds 1 for a true cut and 0 otherwise, one per candidate.

Builders:

- :class:`LLMLabeler` asks any OpenAI-compatible endpoint (a vLLM server included) which numbered
  candidate markers to keep, validates the answer and retries a bounded number of times.
- :func:`build_concat_records` concatenates documents from different sources and labels the seams
  (self-supervised: a seam between two unrelated documents is a true cut), joined the way the
  documents' own parts are, so the layout does not give the seams away.
- :mod:`.corpora` builds long records from real documents whose sections people wrote.

Files are written through :class:`AtomicJsonlWriter`: a line is written only once its record is
validated, into a temporary file that replaces the output when the writer closes, so the output never
holds half a record.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .candidates import DEFAULT_PATTERN, find_candidates


class RecordError(ValueError):
    """A SemanticSeg record does not follow the format."""


class LabelingError(RuntimeError):
    """The endpoint gave no valid answer within the retry budget."""


def validate_record(rec: dict, where: str = "record") -> dict:
    """Check one record; returns it. Raises :class:`RecordError` naming ``where`` and the field."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("text", "candidates", "labels", "category"):
        if key not in rec:
            raise RecordError(f"{where}: missing field {key!r}")
    text, cands, labels = rec["text"], rec["candidates"], rec["labels"]
    if not isinstance(text, str) or not text:
        raise RecordError(f"{where}: 'text' must be a non-empty string")
    if not isinstance(rec["category"], str) or not rec["category"]:
        raise RecordError(f"{where}: 'category' must be a non-empty string")
    if not isinstance(cands, list) or not isinstance(labels, list):
        raise RecordError(f"{where}: 'candidates' and 'labels' must be lists")
    if len(cands) != len(labels):
        raise RecordError(f"{where}: {len(cands)} candidates but {len(labels)} labels")
    prev = 0
    for c in cands:
        if isinstance(c, bool) or not isinstance(c, int) or not prev < c < len(text):
            raise RecordError(f"{where}: candidates must be increasing ints inside (0, {len(text)}), got {c!r}")
        prev = c
    if any(lab not in (0, 1) or isinstance(lab, bool) for lab in labels):
        raise RecordError(f"{where}: labels must be 0 or 1")
    return rec


def make_record(text: str, candidates: Sequence[int], cuts: Iterable[int], category: str, **extra) -> dict:
    """A validated record whose labels are 1 exactly at ``cuts`` (each must be a candidate)."""
    cuts = set(cuts)
    missing = cuts - set(candidates)
    if missing:
        raise RecordError(f"cuts {sorted(missing)} are not candidates")
    rec = {"text": text, "candidates": list(candidates), "labels": [int(c in cuts) for c in candidates],
           "category": category, **extra}
    return validate_record(rec)


def read_records(path: str | os.PathLike) -> list[dict]:
    """All records of a jsonl file, each validated (errors name the file and line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{n}: not JSON ({e})") from None
            out.append(validate_record(rec, f"{path}:{n}"))
    return out


PARTIAL_SUFFIX = ".partial"


class AtomicJsonlWriter:
    """Write validated records to ``path`` through a temporary file in the same directory.

    Each record is validated and serialized before one ``write`` of its whole line; the temporary file
    replaces ``path`` only when the ``with`` block finishes normally (or on :meth:`close`). When the
    block raises (an error, Ctrl-C), ``path`` is left as it was and the complete records written so far
    go to ``path.partial`` (:data:`PARTIAL_SUFFIX`), from which a later run can resume. A process
    killed outright leaves ``path`` untouched too.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._f = os.fdopen(fd, "w", encoding="utf-8")
        self.count = 0

    def write(self, rec: dict) -> None:
        line = json.dumps(validate_record(rec), ensure_ascii=False) + "\n"
        self._f.write(line)
        self.count += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def abort(self) -> Path | None:
        """Keep the complete records in ``path.partial`` and leave ``path`` as it was."""
        if self._f.closed:
            return None
        self._f.flush()
        self._f.close()
        partial = Path(str(self.path) + PARTIAL_SUFFIX)
        os.replace(self.tmp, partial)
        return partial

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    with AtomicJsonlWriter(path) as w:
        for rec in records:
            w.write(rec)
    return w.count


# ----- (b) self-supervised builder --------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # documents of one source never meet at a seam
    category: str
    license: str = ""  # provenance, copied into the records built from the document
    version: str = ""


def chunk_file_text(text: str, source: str, category: str, *, min_chars: int = 200, max_chars: int = 1200,
                    rng: random.Random | None = None) -> list[Document]:
    """Split one file into consecutive documents of whole lines. Each document aims at a random length
    in [min_chars, max_chars] (so equal-length guesses do not find the seams) and, once there, ends at
    the next blank line when one comes before twice that length (any line, in a file without blank
    lines)."""
    rng = rng or random.Random(0)
    has_blank = any(not ln.strip() for ln in text.splitlines())
    docs, cur, size, target = [], [], 0, rng.randint(min_chars, max_chars)

    def flush():
        body = "".join(cur).strip("\n")
        if len(body) >= min_chars // 2:
            docs.append(Document(body + "\n", source, category))

    for ln in text.splitlines(keepends=True):
        if size >= target and (not ln.strip() or not has_blank or size >= 2 * max_chars):
            flush()
            cur, size, target = [], 0, rng.randint(min_chars, max_chars)
            if not ln.strip():
                continue
        cur.append(ln)
        size += len(ln)
    if size >= target:
        flush()
    return docs


def documents_from_files(paths: Iterable[str | os.PathLike], category: str, *, min_chars: int = 200,
                         max_chars: int = 1200, seed: int = 0, license: str = "", version: str = "") -> list[Document]:
    """Documents from text files on disk, one source per file; unreadable or non-UTF-8 files are skipped.
    ``license`` and ``version`` are recorded in every document (and in the records built from it)."""
    rng = random.Random(seed)
    out = []
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.extend(Document(d.text, d.source, d.category, license, version) for d in
                   chunk_file_text(text, str(p), category, min_chars=min_chars, max_chars=max_chars, rng=rng))
    return out


def build_concat_records(docs: Sequence[Document], n: int, *, min_docs: int = 2, max_docs: int = 5, seed: int = 0,
                         pattern: str = DEFAULT_PATTERN, mixed: float = 0.0, sep: str = "auto") -> list[dict]:
    """``n`` records, each the concatenation of ``min_docs..max_docs`` documents of one category from
    distinct sources; the candidate at every seam is labelled 1, every other candidate 0. A share
    ``mixed`` of the records draws from all categories at once (category ``"mixed"``), so that a model
    also learns seams between kinds of text.

    Documents meet with ``sep``; ``"auto"`` uses the line break the category's documents use between
    their own parts, so that a seam looks like any other boundary: a blank line (``"\n\n"``) when most
    of the category's documents contain one (paragraphs), else a single newline (chat turns, code
    without blank lines; also for mixed records). Records carry ``source`` and, when the documents
    name them, ``license`` and ``version``."""
    if not 2 <= min_docs <= max_docs:
        raise ValueError(f"need 2 <= min_docs <= max_docs, got {min_docs}, {max_docs}")
    if not 0.0 <= mixed <= 1.0:
        raise ValueError(f"mixed must be a share in [0, 1], got {mixed}")
    by_cat: dict[str, dict[str, list[Document]]] = {}
    for d in docs:
        by_cat.setdefault(d.category, {}).setdefault(d.source, []).append(d)
    usable = sorted(c for c, srcs in by_cat.items() if len(srcs) >= 2)
    if not usable:
        raise ValueError("need documents from at least two sources of one category")
    pool = {s: ds for srcs in by_cat.values() for s, ds in srcs.items()}
    if sep == "auto":
        seps = {}
        for c, srcs in by_cat.items():
            all_docs = [d for ds in srcs.values() for d in ds]
            blank = sum("\n\n" in d.text.strip("\n") for d in all_docs)
            seps[c] = "\n\n" if 2 * blank > len(all_docs) else "\n"
        seps["mixed"] = "\n"
    elif sep.strip("\n") or not sep:
        raise ValueError(f"sep must be 'auto' or newlines only, got {sep!r}")
    rng = random.Random(seed)
    records = []
    n_mixed = round(n * mixed) if len(by_cat) > 1 else 0
    for i in range(n):
        if i < n_mixed:
            cat, by_source = "mixed", pool
        else:
            cat = usable[(i - n_mixed) % len(usable)]
            by_source = by_cat[cat]
        sources = sorted(by_source)
        m = min(rng.randint(min_docs, max_docs), len(sources))
        picked = [rng.choice(by_source[s]) for s in rng.sample(sources, m)]
        # documents meet like the parts inside them do: the layout gives no seam away
        joiner = seps[cat] if sep == "auto" else sep
        parts = [d.text.strip("\n") + joiner for d in picked]
        parts[-1] = parts[-1].rstrip("\n") + "\n"
        text = "".join(parts)
        seams, pos = [], 0
        for part in parts[:-1]:
            pos += len(part)
            seams.append(pos)
        cands = find_candidates(text, pattern)
        if not set(seams) <= set(cands):
            raise ValueError(f"pattern {pattern!r} does not put a candidate at every document seam")
        prov = {k: "+".join(dict.fromkeys(getattr(d, k) for d in picked if getattr(d, k)))
                for k in ("license", "version")}
        records.append(make_record(text, cands, seams, cat, id=f"{cat}-{i}", source="+".join(d.source for d in picked),
                                   **{k: v for k, v in prov.items() if v}))
    return records


# ----- (a) labelling through an OpenAI-compatible endpoint --------------------------------------

MARK = "[[{}]]"
SYSTEM_PROMPT = (
    "You split long text into self-contained blocks for retrieval. The user's text contains numbered "
    "markers like [[3]] at every place where a block could start. Keep a marker only where a new topic, "
    "document, section, function or conversation turn group begins. Answer with JSON only: "
    '{"cuts": [marker numbers to keep]}.'
)


def mark_candidates(text: str, candidates: Sequence[int]) -> str:
    """``text`` with ``[[i]]`` inserted at candidate ``i``."""
    out, prev = [], 0
    for i, c in enumerate(candidates):
        out += [text[prev:c], MARK.format(i)]
        prev = c
    out.append(text[prev:])
    return "".join(out)


def parse_cut_answer(reply: str | None, num_candidates: int) -> list[int]:
    """Marker indices from a model reply: a JSON object ``{"cuts": [...]}`` or a bare list, optionally
    in a code fence. Raises ValueError for anything else, out-of-range or duplicate indices."""
    if not reply or not reply.strip():
        raise ValueError("empty answer")
    body = reply.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, re.S)
    if fence:
        body = fence.group(1).strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        m = re.search(r"\{.*\}|\[.*\]", body, re.S)
        if not m:
            raise ValueError(f"no JSON in answer {reply[:80]!r}") from None
        try:
            value = json.loads(m.group(0))
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON in answer: {e}") from None
    if isinstance(value, dict):
        if "cuts" not in value:
            raise ValueError(f"JSON answer has no 'cuts' key: {sorted(value)}")
        value = value["cuts"]
    if not isinstance(value, list):
        raise ValueError(f"'cuts' must be a list, got {type(value).__name__}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"cut {v!r} is not an integer marker number")
        if not 0 <= v < num_candidates:
            raise ValueError(f"cut {v} is out of range: markers are 0..{num_candidates - 1}")
    if len(set(value)) != len(value):
        raise ValueError("duplicate marker numbers")
    return sorted(value)


class LLMLabeler:
    """Label candidate cuts with a chat model behind an OpenAI-compatible endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name.
        max_retries: extra attempts after a malformed or invalid answer (or a failed request); each
            retry shows the model its previous answer and what was wrong with it.
        pattern: candidate rule.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str = "EMPTY", max_retries: int = 2,
                 pattern: str = DEFAULT_PATTERN, timeout: float = 120.0, temperature: float = 0.0):
        import openai

        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        # The client's own retries cover transport errors only; content retries are ours, and bounded.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
        self.model, self.max_retries, self.pattern, self.temperature = model, max_retries, pattern, temperature
        self.attempts = 0  # requests sent, for reporting

    def label(self, text: str, category: str, **extra) -> dict:
        """A validated record for ``text``; raises :class:`LabelingError` when every attempt fails."""
        import openai

        cands = find_candidates(text, self.pattern)
        if not cands:
            raise LabelingError("text has no candidate cut point; nothing to label")
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": mark_candidates(text, cands)}]
        errors = []
        for _ in range(self.max_retries + 1):
            self.attempts += 1
            try:
                resp = self.client.chat.completions.create(model=self.model, messages=messages,
                                                           temperature=self.temperature)
                if not getattr(resp, "choices", None):
                    raise ValueError("the endpoint answered with no choices")
                reply = resp.choices[0].message.content
            except (openai.OpenAIError, ValueError, AttributeError, IndexError) as e:
                errors.append(f"request failed: {e}")
                continue
            try:
                cuts = parse_cut_answer(reply, len(cands))
            except ValueError as e:
                errors.append(str(e))
                messages = [*messages, {"role": "assistant", "content": reply or ""},
                            {"role": "user", "content": f"That answer is invalid ({e}). Reply with JSON only: "
                                                        f'{{"cuts": [numbers between 0 and {len(cands) - 1}]}}.'}]
                continue
            return make_record(text, cands, [cands[i] for i in cuts], category, **extra)
        raise LabelingError(f"no valid answer after {self.max_retries + 1} attempts: {errors}")

    def label_all(self, items: Iterable[tuple[str, str]], out_path: str | os.PathLike, *, progress: bool = True,
                  resume: bool = True) -> dict:
        """Label ``(text, category)`` pairs into ``out_path`` (record ``id`` = the item's index);
        failures are counted, never written. An interrupted run (an exception, Ctrl-C) leaves
        ``out_path`` as it was and its finished records in ``out_path.partial``; with ``resume`` a
        rerun takes the records whose id and text match from there (or from a finished ``out_path``)
        instead of asking the endpoint again."""
        from tqdm.auto import tqdm

        items = list(items)
        done: dict[str, dict] = {}
        if resume:
            for prev in (Path(str(out_path) + PARTIAL_SUFFIX), Path(out_path)):
                if prev.is_file():
                    try:
                        for rec in read_records(prev):
                            done.setdefault(str(rec.get("id")), rec)
                    except (RecordError, OSError, UnicodeDecodeError):
                        continue  # unreadable: label again
        stats = {"written": 0, "failed": 0, "resumed": 0}
        with AtomicJsonlWriter(out_path) as w:
            for i, (text, cat) in enumerate(tqdm(items, desc="labelling", disable=not progress)):
                old = done.get(str(i))
                if old is not None and old["text"] == text and old["category"] == cat:
                    w.write(old)
                    stats["resumed"] += 1
                    stats["written"] += 1
                    continue
                try:
                    w.write(self.label(text, cat, id=str(i)))
                    stats["written"] += 1
                except LabelingError:
                    stats["failed"] += 1
        partial = Path(str(out_path) + PARTIAL_SUFFIX)
        if partial.is_file():
            partial.unlink()
        return stats


def main(argv=None) -> int:
    """``python -m vllm_blockattn.segmenter.data label|concat ...``: build SemanticSeg jsonl."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m vllm_blockattn.segmenter.data",
                                 description="Build SemanticSeg-format jsonl for segmenter training.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lab = sub.add_parser("label", help="label texts through an OpenAI-compatible endpoint")
    lab.add_argument("--input", required=True, help='jsonl with {"text": ..., "category": ...} per line')
    lab.add_argument("--output", required=True)
    lab.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    lab.add_argument("--model", required=True, help="served model name")
    lab.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    lab.add_argument("--max-retries", type=int, default=2)
    lab.add_argument("--pattern", default=DEFAULT_PATTERN)
    lab.add_argument("--no-resume", action="store_true",
                     help="label everything again instead of reusing OUTPUT.partial / OUTPUT records")
    cat = sub.add_parser("concat", help="self-supervised records from files of several sources")
    cat.add_argument("--files", nargs="+", required=True, help="text files, each one source")
    cat.add_argument("--category", required=True)
    cat.add_argument("--output", required=True)
    cat.add_argument("--n", type=int, default=100, help="records to build")
    cat.add_argument("--min-docs", type=int, default=2)
    cat.add_argument("--max-docs", type=int, default=4)
    cat.add_argument("--min-chars", type=int, default=200)
    cat.add_argument("--max-chars", type=int, default=1200)
    cat.add_argument("--seed", type=int, default=0)
    cat.add_argument("--sep", default="auto", help="how documents meet: 'auto' (as their own parts do) or newlines")
    cat.add_argument("--license", default="", help="licence of the files, recorded in every record (e.g. MIT)")
    cat.add_argument("--source-version", default="", help="version of the files, recorded in every record")
    args = ap.parse_args(argv)

    if args.cmd == "label":
        items = []
        with open(args.input, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"error: {args.input}:{n}: not JSON ({e})", file=sys.stderr)
                    return 2
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    print(f"error: {args.input}:{n}: expected an object with a 'text' string", file=sys.stderr)
                    return 2
                items.append((row["text"], str(row.get("category", "default"))))
        labeler = LLMLabeler(args.base_url, args.model, api_key=args.api_key, max_retries=args.max_retries,
                             pattern=args.pattern)
        stats = labeler.label_all(items, args.output, resume=not args.no_resume)
    else:
        docs = documents_from_files(args.files, args.category, min_chars=args.min_chars, max_chars=args.max_chars,
                                    seed=args.seed, license=args.license, version=args.source_version)
        recs = build_concat_records(docs, args.n, min_docs=args.min_docs, max_docs=args.max_docs, seed=args.seed,
                                    sep=args.sep)
        stats = {"written": write_records(args.output, recs), "failed": 0}
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
