"""Real documents with human-authored structure, for segmentation data with semantic gold.

Each reader turns one file into a :class:`StructuredDoc`: an ordered list of sections whose
boundaries were authored by people (headings of the Python documentation, top-level definitions of a
Python source file, sessions of a conversation), plus provenance (package, version, licence).
:func:`build_section_records` then cuts long records (several thousand tokens, many sections) out of
consecutive sections, continuing in another document of the same kind when one runs out; every
section start inside a record is a gold cut, and so is every seam between two documents.

One layout convention for every boundary: inside a record every run of blank lines is exactly one
blank line, and sections (and documents) meet with the same separator as the paragraphs inside them
(``"\\n\\n"``; ``"\\n"`` for chat, whose turns are single lines). The whitespace at a gold cut is
therefore the whitespace at any paragraph break: a blank-line splitter finds every paragraph, not the
sections. Markup that people write (a heading, a ``def`` at column 0, a speaker name) stays: it is
part of the document a user would segment.

Sources used by ``train/segmenter_demo.py`` (install with ``train/segmenter_data.sh``):

- ``python3-doc`` (Debian): the reStructuredText sources of the Python documentation, PSF-2.0;
  read as reStructuredText (``docs-rst``), converted to Markdown headings and code fences
  (``docs-md``), or as plain prose with the headings removed (``prose``, sections only by topic);
- the Python standard library's ``.py`` files (the interpreter running this), PSF-2.0 (``code``);
- the Python FAQ turned into a user/assistant chat, one question per user turn, its answer as the
  assistant's turn; gold cuts between FAQ sections (``chat-faq``, PSF-2.0);
- LoCoMo conversations (``chat``), CC BY-NC 4.0: for evaluation only, never for a shipped model;
- Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (the texts are public domain, from
  Project Gutenberg; the package is MIT): one document per novel, one section per chapter with the
  chapter and volume headings removed (``fiction``: chapters marked by the story alone);
- ``prose-mixed``: single passages (an Austen chapter, a section of the Python documentation as
  prose) chained one after another, so a gold cut is where the text turns from one passage to an
  unrelated one (a how-to section followed by a story), with one blank line like every paragraph.
  The R data is read by :func:`read_r_lazyload` (no R needed).
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .candidates import DEFAULT_PATTERN, find_candidates
from .data import make_record

# "MIT" also covers janeaustenr, whose novels are public domain (Project Gutenberg texts) in an MIT package
PERMISSIVE = {"PSF-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "0BSD", "CC0-1.0", "CC-BY-4.0"}


@dataclass
class StructuredDoc:
    """One document as its authored sections (each without leading/trailing blank lines)."""

    sections: list[str]
    source: str
    category: str
    sep: str = "\n\n"  # how sections (and paragraphs) meet
    license: str = ""
    package: str = ""
    version: str = ""
    meta: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def deb_version(package: str) -> str:
    """The installed version of a Debian package, or ``"not-installed"``."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "not-installed"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "not-installed"


JANEAUSTENR = "/usr/lib/R/site-library/janeaustenr/data"   # where Debian's r-cran-janeaustenr installs its data


def janeaustenr_data(out: str) -> tuple[str, str]:
    """(data directory, Debian version) of janeaustenr: the installed package's, else the .deb fetched by
    ``apt-get download`` into ``OUT/debs`` and unpacked there (no R needed: the data is read directly)."""
    import glob

    if os.path.isfile(os.path.join(JANEAUSTENR, "Rdata.rdb")) and deb_version("r-cran-janeaustenr") != "not-installed":
        return JANEAUSTENR, deb_version("r-cran-janeaustenr")
    dest = os.path.abspath(os.path.join(out, "debs"))
    os.makedirs(dest, exist_ok=True)
    debs = sorted(glob.glob(os.path.join(dest, "r-cran-janeaustenr_*.deb")))
    if not debs:
        r = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=dest, capture_output=True, text=True)
        debs = sorted(glob.glob(os.path.join(dest, "r-cran-janeaustenr_*.deb")))
        if not debs:
            raise SystemExit("cannot fetch r-cran-janeaustenr (apt-get download): " + r.stderr.strip()[-400:])
    root = os.path.join(dest, "janeaustenr")
    data = os.path.join(root, JANEAUSTENR.lstrip("/"))
    if not os.path.isfile(os.path.join(data, "Rdata.rdb")):
        subprocess.run(["dpkg-deb", "-x", debs[-1], root], check=True)
    version = subprocess.run(["dpkg-deb", "-f", debs[-1], "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    return data, version


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]


def normalize_blank_lines(text: str) -> str:
    """Every run of blank lines (whitespace-only lines included) becomes one blank line; trailing
    spaces go; no blank lines at either end."""
    lines = [ln.rstrip() for ln in text.split("\n")]
    out: list[str] = []
    for ln in lines:
        if not ln and (not out or not out[-1]):
            continue
        out.append(ln)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def merge_small(sections: Sequence[str], min_chars: int, sep: str) -> list[str]:
    """Join each section shorter than ``min_chars`` to the one after it (the last to the one before)."""
    out: list[str] = []
    carry = ""
    for s in sections:
        s = carry + sep + s if carry else s
        carry = ""
        if len(s) < min_chars:
            carry = s
        else:
            out.append(s)
    if carry:
        if out:
            out[-1] = out[-1] + sep + carry
        else:
            out.append(carry)
    return out


# ----- reStructuredText (the Python documentation) ---------------------------------------------

_ADORN = re.compile(r"^([=\-~^*#\"+'`:.<>_])\1{2,}$")


def rst_headings(lines: Sequence[str]) -> list[tuple[int, int, int, str]]:
    """Section headings of reStructuredText ``lines``: ``(first line, lines used, level, title)``.
    A heading is a title line underlined (optionally also overlined) by one repeated punctuation
    character at least as long as the title; levels follow the order in which styles first appear."""
    styles: dict[tuple[str, bool], int] = {}
    out = []
    i = 0
    while i + 1 < len(lines):
        title, under = lines[i].rstrip(), lines[i + 1].rstrip()
        m = _ADORN.match(under)
        if title.strip() and not _ADORN.match(title) and m and len(under) >= len(title.strip()) \
                and not title.startswith((" ", "\t", "..")):
            over = i > 0 and lines[i - 1].rstrip() == under
            if i == 0 or not lines[i - 1].strip() or over:
                key = (m.group(1), over)
                level = styles.setdefault(key, len(styles) + 1)
                first = i - 1 if over else i
                out.append((first, (3 if over else 2), level, title.strip()))
                i += 2
                continue
        i += 1
    return out


_CODE_DIRECTIVE = re.compile(r"^\.\. (code-block|sourcecode|code|testcode|doctest)::\s*(\S*)\s*$")


def rst_to_markdown(lines: Sequence[str], headings: Sequence[tuple[int, int, int, str]]) -> list[str]:
    """Headings become ``#`` lines; ``.. code-block:: lang`` and ``::`` literal blocks become fenced
    code; everything else is kept."""
    at = {first: (used, level, title) for first, used, level, title in headings}
    out: list[str] = []
    i = 0
    while i < len(lines):
        if i in at:
            used, level, title = at[i]
            out.append("#" * min(level, 6) + " " + title)
            i += used
            continue
        ln = lines[i].rstrip()
        m = _CODE_DIRECTIVE.match(ln)
        literal = ln.endswith("::") and not ln.startswith("..") and ln.strip() != "::"
        if m or literal or ln.strip() == "::":
            if literal:
                out.append(ln[:-1])  # "Example::" renders as "Example:"
            lang = (m.group(2) if m else "") or ("python" if m else "")
            j = i + 1
            while j < len(lines) and (lines[j].strip().startswith(":") and m):  # directive options
                j += 1
            body = []
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith((" ", "\t"))):
                body.append(lines[j].rstrip())
                j += 1
            while body and not body[-1]:
                body.pop()
            while body and not body[0]:
                body.pop(0)
            if body:
                indent = min(len(b) - len(b.lstrip()) for b in body if b.strip())
                out += ["", "```" + lang, *[b[indent:] for b in body], "```", ""]
                i = j
                continue
            i += 1
            continue
        out.append(ln)
        i += 1
    return out


def rst_document(text: str, source: str, *, style: str = "rst", min_section_chars: int = 300,
                 **prov) -> StructuredDoc | None:
    """A Python-docs page as sections split at every heading. ``style``: ``rst`` (as written),
    ``md`` (Markdown headings and fences) or ``prose`` (headings and directives dropped: the sections
    are then marked by topic alone)."""
    lines = text.split("\n")
    heads = rst_headings(lines)
    if len(heads) < 2:
        return None
    if style == "md":
        body_lines = rst_to_markdown(lines, heads)
        starts, fence = [], False
        for i, ln in enumerate(body_lines):
            if ln.startswith("```"):
                fence = not fence
            elif not fence and re.match(r"^#{1,6} ", ln):
                starts.append(i)
    else:
        body_lines = list(lines)
        starts = [first for first, *_ in heads]
        if style == "prose":
            drop = {first + k for first, used, *_ in heads for k in range(used)}
            keep = []
            new_starts = set()
            for i, ln in enumerate(body_lines):
                if i in set(starts):
                    new_starts.add(len(keep))
                if i in drop or ln.startswith(".. ") or re.match(r"^\s+:\w[\w-]*:", ln):
                    continue
                keep.append(ln)
            body_lines, starts = keep, sorted(new_starts)
    bounds = sorted(set([0, *starts])) + [len(body_lines)]
    sections = [normalize_blank_lines("\n".join(body_lines[a:b])) for a, b in zip(bounds, bounds[1:])]
    sections = merge_small([s for s in sections if s.strip()], min_section_chars, "\n\n")
    if len(sections) < 2:
        return None
    cat = {"rst": "docs-rst", "md": "docs-md", "prose": "prose"}[style]
    return StructuredDoc(sections, source, cat, "\n\n", **prov)


# ----- Python source files ----------------------------------------------------------------------


def python_document(src: str, source: str, *, min_section_chars: int = 300, max_class_chars: int = 3000,
                    **prov) -> StructuredDoc | None:
    """A Python file as sections: each top-level ``def``/``class`` (with its decorators and the
    comment lines right above it) is one, and each run of other top-level statements is one. A class
    longer than ``max_class_chars`` is split further at its methods (the class line and anything
    before its first method stay together)."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return None
    lines = src.split("\n")
    starts: list[int] = []
    prev_def = None
    for node in tree.body:
        is_def = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        if is_def or prev_def in (True, None):
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
            while first > 0 and lines[first - 1].startswith("#"):
                first -= 1
            starts.append(first)
        if isinstance(node, ast.ClassDef) and sum(len(x) + 1 for x in lines[first:node.end_lineno]) > max_class_chars:
            for sub in node.body[1:]:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    f = min([sub.lineno, *(d.lineno for d in sub.decorator_list)]) - 1
                    while f > first and lines[f - 1].strip().startswith("#"):
                        f -= 1
                    starts.append(f)
        prev_def = is_def
    bounds = sorted(set([0, *starts])) + [len(lines)]
    sections = [normalize_blank_lines("\n".join(lines[a:b])) for a, b in zip(bounds, bounds[1:])]
    sections = merge_small([s for s in sections if s.strip()], min_section_chars, "\n\n")
    if len(sections) < 2:
        return None
    return StructuredDoc(sections, source, "code", "\n\n", **prov)


# ----- chat -------------------------------------------------------------------------------------


def faq_chat_document(text: str, source: str, *, min_section_chars: int = 300, **prov) -> StructuredDoc | None:
    """A Python FAQ page as a chat: each question (the deepest heading level) is a ``User:`` turn, its
    answer an ``Assistant:`` turn (its lines kept, blank lines dropped); the FAQ's sections (the
    levels between the title and the questions) are the gold blocks, a run of questions on one topic.
    A page without such sections is one block (gold cuts then fall between pages)."""
    lines = text.split("\n")
    heads = rst_headings(lines)
    if not heads:
        return None
    qlevel = max(level for *_, level, _t in heads)  # questions are the deepest headings
    groups: list[list[str]] = [[]]
    for n, (first, used, level, title) in enumerate(heads):
        end = heads[n + 1][0] if n + 1 < len(heads) else len(lines)
        body = [ln for ln in lines[first + used : end] if not ln.startswith(".. ") and ln.strip()]
        if 1 < level < qlevel:
            groups.append([])
        elif level == qlevel > 1:
            if body:
                groups[-1] += [f"User: {title}", "Assistant: " + body[0].strip(), *(ln.rstrip() for ln in body[1:])]
    sections = merge_small(["\n".join(g) for g in groups if g], min_section_chars, "\n")
    if not sections:
        return None
    return StructuredDoc(sections, source, "chat-faq", "\n", **prov)


def locomo_documents(conversations: Sequence[dict], **prov) -> list[StructuredDoc]:
    """LoCoMo: one document per conversation, one section per session (``Speaker: text`` turns)."""
    out = []
    for conv in conversations:
        c = conv["conversation"]
        keys = sorted((k for k in c if re.fullmatch(r"session_\d+", k)), key=lambda k: int(k.split("_")[1]))
        sections = ["\n".join(f"{t['speaker']}: {' '.join(t['text'].split())}" for t in c[k]) for k in keys]
        sections = [s for s in sections if s]
        if len(sections) >= 2:
            out.append(StructuredDoc(sections, f"locomo:{conv['sample_id']}", "chat", "\n", **prov))
    return out


# ----- R data (janeaustenr) ---------------------------------------------------------------------


class _RReader:
    """The subset of R's XDR serialization (versions 2 and 3) that data packages use: vectors of
    strings, numbers and lists, with attributes (a ``names`` attribute turns a vector into a dict)."""

    _SPECIAL = {241, 242, 247, 251, 252, 253, 254}  # environments, unbound, missing, NULL

    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in self._SPECIAL:
            return None
        if t == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if t == 1:  # symbol
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if t in (2, 6, 17):  # pairlists: [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return [(tag[1] if isinstance(tag, tuple) else tag, car), *(cdr or [])]
        if t == 9:  # one string
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i : self.i + n]
            self.i += n
            return s.decode("latin-1" if flags & (1 << 2) else "utf-8", errors="replace")
        if t in (10, 13):
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == 14:
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t in (16, 19, 20):
            v = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R object type {t} is not supported")
        if has_attr:
            attrs = dict(self.item() or [])
            if attrs.get("names") is not None:
                return dict(zip(attrs["names"], v))
        return v

    def top(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.i = 2
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal version to read it
        if version == 3:
            n = self.int()  # native encoding name
            self.i += n
        return self.item()


def read_r_lazyload(base: str) -> dict:
    """The objects of an R lazy-load database (``base.rdx`` index + ``base.rdb`` data, as installed R
    packages keep their data), by name. Only zlib-compressed databases (R's default) are read."""
    with open(base + ".rdx", "rb") as f:
        raw = f.read()
    index = _RReader(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).top()
    if index.get("compressed") not in ([1], [True]):
        raise ValueError(f"{base}.rdb: only zlib-compressed lazy-load data is supported")
    out = {}
    with open(base + ".rdb", "rb") as f:
        db = f.read()
    for name, (off, n) in index["variables"].items():
        blob = db[int(off) : int(off) + int(n)]
        (size,) = struct.unpack(">I", blob[:4])
        data = zlib.decompress(blob[4:])
        if len(data) != size:
            raise ValueError(f"{base}.rdb: {name} has {len(data)} bytes, the index says {size}")
        out[name] = _RReader(data).top()
    return out


AUSTEN_TITLES = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}
_END_MATTER = re.compile(r"^\s*(a note on the text|\*+\s*end of (the|this) project gutenberg)", re.IGNORECASE)
_CHAPTER = re.compile(r"^\s*(chapter|volume)\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)


def novel_document(lines: Sequence[str | None], source: str, *, min_section_chars: int = 300,
                   **prov) -> StructuredDoc | None:
    """A novel given as its lines: one section per chapter, the chapter and volume heading lines and
    everything before the first chapter (title page) removed, so only the story marks a chapter."""
    lines = ["" if ln is None else ln.rstrip() for ln in lines]
    starts = [i for i, ln in enumerate(lines) if _CHAPTER.match(ln)]
    if len(starts) < 2:
        return None
    chapters: list[list[str]] = [[]]
    for ln in lines[starts[0]:]:
        if _END_MATTER.match(ln):  # an editor's note after the story (not the author's text)
            break
        if _CHAPTER.match(ln):  # a chapter (or volume) heading starts a new section
            if "\n".join(chapters[-1]).strip():
                chapters.append([])
            continue
        chapters[-1].append(ln)
    sections = [normalize_blank_lines("\n".join(c)).strip("\n") for c in chapters]
    sections = merge_small([s for s in sections if s.strip()], min_section_chars, "\n\n")
    if len(sections) < 2:
        return None
    return StructuredDoc(sections, source, "fiction", "\n\n", **prov)


def austen_documents(data_dir: str, **prov) -> list[StructuredDoc]:
    """Jane Austen's six novels from janeaustenr's installed data directory (``.../janeaustenr/data``),
    one :class:`StructuredDoc` per novel (``source`` = ``janeaustenr:<name>``)."""
    objs = read_r_lazyload(os.path.join(data_dir, "Rdata"))
    out = []
    for name in sorted(objs):
        if name not in AUSTEN_TITLES:
            continue
        doc = novel_document(objs[name], f"janeaustenr:{name}", **prov)
        if doc:
            doc.meta["title"] = AUSTEN_TITLES[name]
            out.append(doc)
    return out


def passage_documents(groups: dict[str, Sequence[StructuredDoc]], n_per_group: int, *, seed: int = 0,
                      category: str = "prose-mixed", min_chars: int = 800) -> list[StructuredDoc]:
    """Single passages for ``prose-mixed``: from each group (a kind of text, e.g. ``fiction`` and
    ``prose``) up to ``n_per_group`` sections of at least ``min_chars`` chars, each its own one-section
    document, so that :func:`build_section_records` puts a gold cut exactly where one passage gives way
    to another. Every group gives the same number (the smallest group's count when it has fewer than
    ``n_per_group``), so that neither kind dominates the seams."""
    rng = random.Random(seed)
    eligible = {g: [(d, j) for d in sorted(groups[g], key=lambda d: d.source)
                    for j, s in enumerate(d.sections) if len(s) >= min_chars] for g in sorted(groups)}
    take = min([n_per_group, *(len(v) for v in eligible.values())])  # as many from each group
    out = []
    for group, secs in eligible.items():
        for d, j in rng.sample(secs, take):
            out.append(StructuredDoc([d.sections[j]], f"{d.source}#{j}", category, d.sep, d.license, d.package,
                                     d.version, {"group": group, "document": d.source}))
    return out


# ----- records ----------------------------------------------------------------------------------


def _tail_lines(text: str, keep: int) -> str:
    """The last whole lines of ``text`` holding at most ``keep`` chars (at least the last line)."""
    lines = text.split("\n")
    out, size = [], 0
    for ln in reversed(lines):
        if out and size + len(ln) + 1 > keep:
            break
        out.append(ln)
        size += len(ln) + 1
    return "\n".join(reversed(out)).strip("\n") or lines[-1]


def _head_lines(text: str, keep: int) -> str:
    """The first whole lines of ``text`` holding at most ``keep`` chars (at least the first line)."""
    lines = text.split("\n")
    out, size = [], 0
    for ln in lines:
        if out and size + len(ln) + 1 > keep:
            break
        out.append(ln)
        size += len(ln) + 1
    return "\n".join(out).strip("\n") or lines[0]


def build_section_records(docs: Sequence[StructuredDoc], n: int, *, min_chars: int = 6000, max_chars: int = 24000,
                          seed: int = 0, pattern: str = DEFAULT_PATTERN, id_prefix: str = "",
                          trim: bool = True) -> list[dict]:
    """``n`` records per category present in ``docs`` (round robin), each a run of consecutive sections
    from one document, continued in another document of the category (a seam) when it runs out, until
    the text reaches a random length in ``[min_chars, max_chars]``. Gold cuts: every section start and
    every seam. With ``trim`` the record starts inside its first section (its last whole lines, at
    most half the target length) and ends inside its last one (whole lines up to the target), like a
    window over a long text; then sections longer than the target still give records with cuts.
    Records carry ``source`` (the documents, ``+``-joined), ``license``, ``package`` and ``version``
    (``+``-joined distinct values)."""
    by_cat: dict[str, list[StructuredDoc]] = {}
    for d in docs:
        by_cat.setdefault(d.category, []).append(d)
    rng = random.Random(seed)
    out = []
    for cat in sorted(by_cat):
        pool = sorted(by_cat[cat], key=lambda d: d.source)
        for i in range(n):
            target = rng.randint(min_chars, max_chars)
            doc = rng.choice(pool)
            pos = rng.randrange(len(doc.sections))
            parts: list[str] = []
            used: list[StructuredDoc] = []
            size = 0
            while size < target:
                if doc not in used:
                    used.append(doc)
                sec = doc.sections[pos]
                if trim and not parts:
                    sec = _tail_lines(sec, rng.randint(min(200, target // 2), max(200, target // 2)))
                elif trim and size + len(sec) > target:
                    sec = _head_lines(sec, max(target - size, 1))
                parts.append(sec)
                size += len(sec) + len(doc.sep)
                pos += 1
                if pos == len(doc.sections):  # continue in another document: a seam
                    others = [d for d in pool if d is not doc]
                    if not others:
                        break
                    doc, pos = rng.choice(others), 0
                if len(parts) > 10000:
                    break
            if len(parts) < 2:
                continue
            sep = used[0].sep
            text = sep.join(parts) + "\n"
            gold, p = [], 0
            for part in parts[:-1]:
                p += len(part) + len(sep)
                gold.append(p)
            cands = find_candidates(text, pattern)
            if not set(gold) <= set(cands):
                raise ValueError(f"pattern {pattern!r} does not put a candidate at every section start")
            uniq = lambda xs: "+".join(dict.fromkeys(x for x in xs if x))  # noqa: E731
            out.append(make_record(text, cands, gold, cat, id=f"{id_prefix}{cat}-{i}",
                                   source=uniq(d.source for d in used), license=uniq(d.license for d in used),
                                   package=uniq(d.package for d in used), version=uniq(d.version for d in used)))
    return out


def source_document(source: str) -> str:
    """The document a record starts in, from its ``source``: the first of the ``+``-joined documents,
    without a passage suffix (``"python3-doc:faq/gui.rst.txt+python3-doc:faq/library.rst.txt"`` ->
    ``"python3-doc:faq/gui.rst.txt"``; ``"janeaustenr:emma#43+..."`` -> ``"janeaustenr:emma"``). The
    unit of a cluster bootstrap: records cut from one document are not independent samples."""
    return source.split("+", 1)[0].split("#", 1)[0]


def licenses_of(records: Iterable[dict]) -> set[str]:
    """Every licence named by ``records`` (``+``-joined values split)."""
    return {lic for r in records for lic in str(r.get("license", "")).split("+") if lic}


def stdlib_provenance() -> dict:
    return {"license": "PSF-2.0", "package": "python-stdlib", "version": sys.version.split()[0]}
