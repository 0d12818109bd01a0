"""Reuse-stable segmentation: how much of a document is cut the same way wherever it appears.

The block cache keys a block's KV by the block's own tokens, so a document's KV is reused only when
the document is cut into the same blocks each time it appears. The **stability** of a segmenter on a
document is the fraction of the document's tokens that lie in blocks reproduced byte for byte when
the document is embedded in other contexts:

- cut the document alone: blocks ``B_1 .. B_n`` at char spans ``[a_i, b_i)``;
- for each context (other documents before and/or after, at several offsets ``o``), cut the whole
  text; block ``B_i`` *survives* in that context when ``[o + a_i, o + b_i)`` is exactly one of the
  blocks of the whole text (same bytes, cut at both ends, so its block-cache key is the same);
- stability = sum over contexts of the surviving blocks' tokens / (number of contexts x the
  document's tokens). 1.0: every block of the document hits the block cache in every context.

Blocks at a document's edges may legitimately differ (the text around it decides whether its first
line continues what precedes it), so stability below 1 is expected at the edges; the guarantees
are about the **interior** (:func:`learned_interior`, :func:`vllm_blockattn.segmenter.rules.rule_interior`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .candidates import find_candidates

Segment = Callable[[str], Sequence[str]]


def spans(blocks: Sequence[str], offset: int = 0) -> list[tuple[int, int]]:
    """Char spans ``[start, end)`` of consecutive ``blocks``, shifted by ``offset``."""
    out, pos = [], offset
    for b in blocks:
        out.append((pos, pos + len(b)))
        pos += len(b)
    return out


def surviving(doc_blocks: Sequence[str], context_blocks: Sequence[str], offset: int) -> list[bool]:
    """For each block of the document alone, whether it is exactly a block of the context whose
    text holds the document at char ``offset``."""
    have = set(spans(context_blocks))
    return [sp in have for sp in spans(doc_blocks, offset)]


@dataclass
class Stability:
    """Stable and total tokens over contexts; ``fraction`` is the stability."""

    stable_tokens: int = 0
    total_tokens: int = 0
    per_context: list[float] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.stable_tokens / self.total_tokens if self.total_tokens else 1.0

    def add(self, other: Stability) -> Stability:
        self.stable_tokens += other.stable_tokens
        self.total_tokens += other.total_tokens
        self.per_context += other.per_context
        return self


def utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def stability(doc: str, segment: Segment, contexts: Sequence[tuple[str, str]],
              count: Callable[[str], int] | None = None, doc_blocks: Sequence[str] | None = None) -> Stability:
    """Stability of ``segment`` on ``doc`` over ``contexts`` (``(prefix, suffix)`` pairs: the text
    ``prefix + doc + suffix``), weighting blocks by ``count`` (default: UTF-8 bytes)."""
    count = count or utf8_bytes
    blocks = list(doc_blocks) if doc_blocks is not None else list(segment(doc))
    if "".join(blocks) != doc:
        raise ValueError("the segmenter's blocks do not concatenate to the document")
    sizes = [count(b) for b in blocks]
    total = sum(sizes)
    out = Stability()
    for prefix, suffix in contexts:
        whole = prefix + doc + suffix
        ctx_blocks = list(segment(whole))
        if "".join(ctx_blocks) != whole:
            raise ValueError("the segmenter's blocks do not concatenate to the text")
        ok = sum(n for n, s in zip(sizes, surviving(blocks, ctx_blocks, len(prefix))) if s)
        out.stable_tokens += ok
        out.total_tokens += total
        out.per_context.append(ok / total if total else 1.0)
    return out


def random_contexts(others: Sequence[str], n: int, rng: random.Random, *, max_docs: int = 3,
                    separators: Sequence[str] = ("\n\n", "\n")) -> list[tuple[str, str]]:
    """``n`` contexts made of other documents: context ``i`` puts 0..``max_docs`` documents before
    and after (at least one document somewhere), the first one before starting at a random line so
    that the offset varies, joined by a separator drawn from ``separators``."""
    if not others:
        raise ValueError("random_contexts needs other documents")
    out = []
    for _ in range(n):
        k_before, k_after = rng.randint(0, max_docs), rng.randint(0, max_docs)
        if k_before + k_after == 0:
            k_before = 1
        before = [rng.choice(others) for _ in range(k_before)]
        after = [rng.choice(others) for _ in range(k_after)]
        if before:  # start the first document at a random line: the offset is not a document start
            starts = [0, *(m.end() for m in re.finditer(r"\n", before[0]) if m.end() < len(before[0]))]
            before[0] = before[0][rng.choice(starts):]
        if after:  # end the last one at a random line end
            ends = [m.end() for m in re.finditer(r"\n", after[-1])] or [len(after[-1])]
            after[-1] = after[-1][: rng.choice(ends)]
        prefix = "".join(d.rstrip("\n") + rng.choice(separators) for d in before)
        suffix = "".join(rng.choice(separators) + d.strip("\n") for d in after)
        out.append((prefix, suffix))
    return out


def learned_interior(segmenter, doc: str) -> list[int]:
    """Candidates of ``doc`` in its interior for a learned segmenter with content windows: each
    gets the same cut probability wherever ``doc`` is placed inside a longer text.

    A candidate is interior when every token within :meth:`Segmenter.receptive_field` tokens of its
    read-out token belongs to a piece of ``doc`` other than its first and last (those may merge with
    the text around ``doc``), and, for a head that reads layout features, when the lines those
    features read lie there too. ``[]`` for ``windowing="fixed"``, which guarantees nothing.
    """
    reach = segmenter.receptive_field()
    if reach is None:
        return []
    cands = find_candidates(doc, segmenter.config.pattern)
    if len(cands) < 2:
        return []
    ids, ends, _pieces = segmenter.tokenize_pieces(doc, cands)
    lo_tok, hi_tok = ends[0] + 1, ends[-2]  # tokens of pieces 1 .. n-2
    lo_char, hi_char = cands[0], cands[-1]  # chars of pieces 1 .. n-2
    out = []
    for i, c in enumerate(cands):
        r = ends[i + 1] if segmenter.causal else ends[i]
        if r - reach < lo_tok or r + reach > hi_tok:
            continue
        if getattr(segmenter.config, "layout", False):
            a, b = _layout_reach(doc, c)
            if a < lo_char or b > hi_char:
                continue
        out.append(c)
    return out


def _layout_reach(text: str, c: int, lines_before: int = 9) -> tuple[int, int]:
    """Char span a candidate's layout features may read (vllm_blockattn.segmenter.layout_features):
    the newline run before ``c`` and up to ``lines_before`` non-blank lines before it, and the two
    lines from ``c`` on; generous by a line on each side."""
    start = c
    seen = 0
    while start > 0 and seen <= lines_before:
        prev = text.rfind("\n", 0, start - 1)
        line = text[prev + 1 : start]
        if line.strip():
            seen += 1
        start = prev + 1 if prev >= 0 else 0
        if prev < 0:
            break
    end = c
    for _ in range(3):
        nxt = text.find("\n", end)
        if nxt < 0:
            end = len(text)
            break
        end = nxt + 1
    return start, end
