"""Baseline segmenters, each returning exactly ``k`` blocks (the learned model's block count, so that
every method is compared at the same granularity).

- ``random``: k-1 cuts at random token starts.
- ``average``: k blocks of equal token length.
- ``punctuation``: cuts after sentence ends (``.!?`` then whitespace), those nearest equal-length targets.
- ``random_candidate`` / ``average_candidate``: the same two rules restricted to the segmenter's
  candidate points (newlines by default).
- ``blank_line``: paragraph cuts, at the start of every line that follows a blank line (what a user
  tries first); at ``k`` blocks, the blank lines nearest equal-length targets.
- ``heading``: Markdown (``#`` lines, setext underlines) and reStructuredText (underlined or
  overlined titles) headings outside code fences, the way a Markdown header splitter cuts; at ``k``
  blocks the highest-level headings come first (spread when a level has more than needed), then
  blank lines, then newlines.
- ``loss_topk`` / ``entropy_topk``: a causal LM scores every token by its loss (surprise) or by the
  entropy of the prediction before it; the token range is split into k-1 equal chunks and the
  highest-scoring token of each chunk starts a block (chunking keeps the cuts from clustering).

Cut units are the distinct char offsets where a token starts (words, without a tokenizer). When a rule
has fewer points than it needs, the remaining cuts come from token starts nearest equal-length targets.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch

from .candidates import DEFAULT_PATTERN, SegmenterInputError, find_candidates, split_at, spread

SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
BASELINES = ("random", "average", "punctuation", "random_candidate", "average_candidate", "blank_line", "heading",
             "loss_topk", "entropy_topk")
# rules with a block count of their own (every point the rule finds), besides their k-block form
NATURAL = ("blank_line", "heading")
BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_UNDERLINE = re.compile(r"^([=\-~^*#\"+'`:.<>_])\1{2,}[ \t]*$")
_ATX = re.compile(r"^#{1,6}[ \t]+\S")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")


def token_units(text: str, tokenizer=None) -> tuple[list[int], list[int]]:
    """(unit char offsets inside the text, index of the first token at each unit)."""
    if tokenizer is None:
        starts = [m.start() for m in re.finditer(r"\S+", text)]
        pairs = [(s, i) for i, s in enumerate(starts)]
    else:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pairs = [(s, i) for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s]
    units, first, seen = [], [], set()
    for s, i in pairs:
        if 0 < s < len(text) and s not in seen:
            seen.add(s)
            units.append(s)
            first.append(i)
    return units, first


def _check_k(text: str, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SegmenterInputError(f"number of blocks k must be a positive int, got {k!r}")
    if not text:
        raise SegmenterInputError("cannot cut empty text into blocks")


def _fill(points: Sequence[int], need: int, units: Sequence[int], n: int, rng: random.Random | None = None) -> list[int]:
    """``need`` cuts from ``points`` (spread, or random with ``rng``), topped up from ``units``."""
    points = sorted(set(points))
    if len(points) >= need:
        return sorted(rng.sample(points, need)) if rng else spread(points, need, n)
    rest = sorted(set(units) - set(points))
    extra = need - len(points)
    if extra > len(rest):
        raise SegmenterInputError(f"text of {n} chars has only {len(points) + len(rest)} cut positions; "
                                  f"cannot make {need + 1} blocks")
    return sorted(points + (rng.sample(rest, extra) if rng else spread(rest, extra, n)))


def random_blocks(text: str, k: int, *, tokenizer=None, seed: int = 0, **_) -> list[str]:
    _check_k(text, k)
    units, _first = token_units(text, tokenizer)
    return split_at(text, _fill([], k - 1, units, len(text), random.Random(seed)))


def average_blocks(text: str, k: int, *, tokenizer=None, **_) -> list[str]:
    _check_k(text, k)
    units, first = token_units(text, tokenizer)
    if k - 1 > len(units):
        raise SegmenterInputError(f"text has only {len(units)} cut positions; cannot make {k} blocks")
    # equal token counts: cut at the units whose token index is nearest j * T / k
    total = (first[-1] + 1) if first else 1
    by_tok = dict(zip(first, units))
    chosen = spread(first, k - 1, total) if k > 1 else []
    return split_at(text, sorted(by_tok[t] for t in chosen))


def punctuation_blocks(text: str, k: int, *, tokenizer=None, **_) -> list[str]:
    _check_k(text, k)
    units, _first = token_units(text, tokenizer)
    ends = [m.end() for m in SENTENCE_END.finditer(text) if 0 < m.end() < len(text)]
    return split_at(text, _fill(ends, k - 1, units, len(text)))


def random_candidate_blocks(text: str, k: int, *, tokenizer=None, seed: int = 0, pattern: str = DEFAULT_PATTERN, **_):
    _check_k(text, k)
    units, _first = token_units(text, tokenizer)
    return split_at(text, _fill(find_candidates(text, pattern), k - 1, units, len(text), random.Random(seed)))


def average_candidate_blocks(text: str, k: int, *, tokenizer=None, pattern: str = DEFAULT_PATTERN, **_):
    _check_k(text, k)
    units, _first = token_units(text, tokenizer)
    return split_at(text, _fill(find_candidates(text, pattern), k - 1, units, len(text)))


def blank_line_cuts(text: str) -> list[int]:
    """Start of every non-blank line that follows at least one blank line."""
    return sorted({m.end() for m in BLANK_LINE.finditer(text) if 0 < m.end() < len(text)})


def heading_cuts(text: str) -> list[tuple[int, int]]:
    """``(offset of the heading's first line, level)`` for Markdown ATX headings (``#`` count), setext
    and reStructuredText headings (levels by first appearance of each underline style, after ATX
    levels), outside code fences. Offset 0 is left out (no cut before the text)."""
    lines = text.split("\n")
    offs, pos = [], 0
    for ln in lines:
        offs.append(pos)
        pos += len(ln) + 1
    out: dict[int, int] = {}
    styles: dict[tuple[str, bool], int] = {}
    fence = False
    skip = -1
    for i, ln in enumerate(lines):
        if _FENCE.match(ln):
            fence = not fence
            continue
        if fence or i <= skip:
            continue
        if _ATX.match(ln):
            out[offs[i]] = len(ln) - len(ln.lstrip("#"))
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        m = _UNDERLINE.match(nxt)
        if ln.strip() and not ln[0].isspace() and not _UNDERLINE.match(ln) and m and len(nxt.rstrip()) >= len(ln.strip()):
            over = i > 0 and lines[i - 1].rstrip() == nxt.rstrip()
            if i == 0 or over or not lines[i - 1].strip():
                level = 6 + styles.setdefault((m.group(1), over), len(styles) + 1)
                out[offs[i - 1] if over else offs[i]] = level
                skip = i + 1
    return sorted((o, lv) for o, lv in out.items() if 0 < o < len(text))


def _fill_tiers(tiers: Sequence[Sequence[int]], need: int, n: int) -> list[int]:
    """``need`` cuts taken tier by tier (a tier that does not fit is spread over the text)."""
    chosen: list[int] = []
    for tier in tiers:
        rest = sorted(set(tier) - set(chosen))
        if len(chosen) + len(rest) <= need:
            chosen += rest
        else:
            chosen += spread(rest, need - len(chosen), n)
        if len(chosen) == need:
            break
    if len(chosen) < need:
        raise SegmenterInputError(f"text of {n} chars has only {len(chosen)} cut positions; cannot make {need + 1} blocks")
    return sorted(chosen)


def blank_line_blocks(text: str, k: int, *, tokenizer=None, pattern: str = DEFAULT_PATTERN, **_) -> list[str]:
    _check_k(text, k)
    units, _first = token_units(text, tokenizer)
    return split_at(text, _fill_tiers([blank_line_cuts(text), find_candidates(text, pattern), units], k - 1, len(text)))


def heading_blocks(text: str, k: int, *, tokenizer=None, pattern: str = DEFAULT_PATTERN, **_) -> list[str]:
    _check_k(text, k)
    units, _first = token_units(text, tokenizer)
    heads = heading_cuts(text)
    levels = sorted({lv for _o, lv in heads})
    tiers = [[o for o, lv in heads if lv == level] for level in levels]
    return split_at(text, _fill_tiers([*tiers, blank_line_cuts(text), find_candidates(text, pattern), units],
                                      k - 1, len(text)))


def natural_blocks(name: str, text: str) -> list[str]:
    """Blocks of a rule at its own count: every blank line (``blank_line``) or every heading
    (``heading``; no heading gives one block)."""
    if name == "blank_line":
        return split_at(text, blank_line_cuts(text))
    if name == "heading":
        return split_at(text, [o for o, _lv in heading_cuts(text)])
    raise SegmenterInputError(f"baseline {name!r} has no natural block count; expected one of {NATURAL}")


class LMScorer:
    """Per-token loss and predictive entropy from a causal LM, over overlapping windows so that long
    texts are scored whole (each token keeps at least ``overlap`` tokens of left context)."""

    def __init__(self, model, tokenizer, *, window: int = 1024, overlap: int = 128):
        if not 0 <= overlap < window:
            raise ValueError(f"overlap must be in [0, window), got {overlap} for window {window}")
        self.model, self.tokenizer = model.eval(), tokenizer
        limit = getattr(model.config, "max_position_embeddings", None)
        self.window = min(window, limit) if limit else window
        self.overlap = min(overlap, self.window // 2)
        self._cache: tuple[str, list[int], torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(cls, path, **kw) -> LMScorer:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(path), **kw)

    @torch.no_grad()
    def token_scores(self, text: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(token ids, loss[T], entropy[T]); token 0 has no prediction and scores 0."""
        if self._cache is not None and self._cache[0] == text:
            return self._cache[1:]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids)
        loss, ent = torch.zeros(n), torch.zeros(n)
        stride = self.window - self.overlap
        for s in range(0, max(n - self.overlap, 1) if n > 1 else 0, stride):
            chunk = ids[s : s + self.window]
            logp = torch.log_softmax(self.model(input_ids=torch.tensor([chunk])).logits[0].float(), -1)[:-1]
            tok_loss = -logp.gather(1, torch.tensor(chunk[1:])[:, None])[:, 0]
            tok_ent = -(logp.exp() * logp).sum(-1)
            lo = s + (self.overlap if s > 0 else 1)  # tokens this window owns (each has a prediction)
            hi = min(s + self.window, n)
            loss[lo:hi] = tok_loss[lo - 1 - s : hi - 1 - s]
            ent[lo:hi] = tok_ent[lo - 1 - s : hi - 1 - s]
        self._cache = (text, ids, loss, ent)
        return ids, loss, ent


def _topk_chunked(text: str, k: int, scorer: LMScorer, which: str) -> list[str]:
    _check_k(text, k)
    units, first = token_units(text, scorer.tokenizer)
    if k - 1 > len(units):
        raise SegmenterInputError(f"text has only {len(units)} cut positions; cannot make {k} blocks")
    if k == 1:
        return [text]
    _ids, loss, ent = scorer.token_scores(text)
    score = (loss if which == "loss" else ent)[first]
    edges = [round(j * len(units) / (k - 1)) for j in range(k)]
    cuts = [units[a + int(torch.argmax(score[a:b]))] for a, b in zip(edges, edges[1:])]
    return split_at(text, cuts)


def loss_topk_blocks(text: str, k: int, *, scorer: LMScorer, **_) -> list[str]:
    return _topk_chunked(text, k, scorer, "loss")


def entropy_topk_blocks(text: str, k: int, *, scorer: LMScorer, **_) -> list[str]:
    return _topk_chunked(text, k, scorer, "entropy")


_FUNCS = {
    "random": random_blocks, "average": average_blocks, "punctuation": punctuation_blocks,
    "random_candidate": random_candidate_blocks, "average_candidate": average_candidate_blocks,
    "blank_line": blank_line_blocks, "heading": heading_blocks,
    "loss_topk": loss_topk_blocks, "entropy_topk": entropy_topk_blocks,
}


def baseline_blocks(name: str, text: str, k: int, *, tokenizer=None, scorer: LMScorer | None = None, seed: int = 0,
                    pattern: str = DEFAULT_PATTERN) -> list[str]:
    """Blocks of ``text`` by the baseline ``name`` (one of :data:`BASELINES`), exactly ``k`` of them.
    ``loss_topk``/``entropy_topk`` need ``scorer``; the others use ``tokenizer`` (or words) as units."""
    if name not in _FUNCS:
        raise SegmenterInputError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    if name in ("loss_topk", "entropy_topk"):
        if scorer is None:
            raise SegmenterInputError(f"baseline {name!r} needs an LMScorer (a causal LM)")
        return _FUNCS[name](text, k, scorer=scorer)
    return _FUNCS[name](text, k, tokenizer=tokenizer, seed=seed, pattern=pattern)
