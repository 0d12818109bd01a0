"""A content-defined rule segmenter: blocks of at most ``max_tokens`` whose cuts depend on the text
near them only, so a document is cut the same way wherever it appears (docs/auto_segmentation.md).

The greedy rule segmenter (:func:`rule_based_segments`, below) packs units into a
block until the next one would not fit: every cut depends on where the previous block started, so a
document placed after other text is cut differently all the way through. Here:

1. **Atoms.** The text is split at paragraph breaks when it is longer than ``max_tokens``; a paragraph
   still too long is split at line breaks, then sentence ends, then whitespace, then into equal
   character runs (the same levels as the greedy segmenter). Each split depends on the unit being
   split alone. Each boundary between atoms has a *level* (0 = paragraph break ... 4 = inside a word).
2. **Token positions.** ``P_i`` is the sum of the atoms' token counts up to boundary ``i``.
3. **Winnowing.** For every window of ``max_tokens`` tokens that starts at a boundary (or at the start
   of the text), the best boundary inside it, ``(P_x, P_x + max_tokens]``, becomes a cut: the lowest
   level first (paragraph breaks before line breaks ...), then the lowest CRC-32 of the atom before
   it, then the rightmost. Every window holds a cut, so no block is longer than ``max_tokens`` (by
   the sum of its atoms' counts); a boundary's fate depends on the atoms within ``max_tokens``
   tokens on each side of it. Blocks average about half of ``max_tokens`` (the price of locality).

Interior (what is guaranteed, tested in tests/test_segmenter_stability.py): a document ``D`` placed
anywhere in a longer text is cut identically at every boundary ``b`` of ``D`` alone with
``[P_b - max_tokens, P_b + max_tokens]`` inside ``D``'s paragraphs other than its first and last
(:func:`rule_interior`).
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from collections.abc import Callable

from .candidates import SegmenterInputError


def split_keep(text: str, pattern: str) -> list[str]:
    """Split after each match of ``pattern``, keeping the separator with the piece before it."""
    out, last = [], 0
    for m in re.finditer(pattern, text):
        if m.end() > last:
            out.append(text[last : m.end()])
            last = m.end()
    if last < len(text):
        out.append(text[last:])
    return out


# paragraph break, line break, sentence end, whitespace: the rule segmenters' levels
LEVELS = (r"\n\s*\n", r"\n", r"(?<=[.!?。！？；;])\s*", r"\s+")


def rule_based_segments(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Pack paragraphs (then lines, sentences, words, characters for what is still too long) greedily
    into blocks of at most ``max_tokens`` (by ``count``). The blocks concatenate to ``text``."""

    def units(piece: str, level: int) -> list[str]:
        if count(piece) <= max_tokens:
            return [piece]
        if level == len(LEVELS):
            step = max(1, len(piece) * max_tokens // max(count(piece), 1))
            return [piece[i : i + step] for i in range(0, len(piece), step)]
        parts = split_keep(piece, LEVELS[level])
        if len(parts) == 1:
            return units(piece, level + 1)
        return [u for p in parts for u in units(p, level + 1)]

    blocks: list[str] = []
    current, current_len = "", 0
    for unit in units(text, 0):
        n = count(unit)
        if current and current_len + n > max_tokens and current.strip():
            blocks.append(current)
            current, current_len = "", 0
        current += unit
        current_len += n
    if current:
        if blocks and not current.strip():
            blocks[-1] += current
        else:
            blocks.append(current)
    return blocks


CHAR_LEVEL = len(LEVELS)


def atoms(text: str, max_tokens: int, count: Callable[[str], int]) -> tuple[list[str], list[int], list[int]]:
    """(atoms, token count of each atom, level of the boundary after each atom but the last)."""

    def units(piece: str, level: int) -> tuple[list[tuple[str, int]], list[int]]:
        n = count(piece)
        if n <= max_tokens:
            return [(piece, n)], []
        if level == CHAR_LEVEL:
            step = max(1, len(piece) * max_tokens // max(n, 1))
            parts = [piece[i : i + step] for i in range(0, len(piece), step)]
            return [(p, count(p)) for p in parts], [CHAR_LEVEL] * (len(parts) - 1)
        parts = split_keep(piece, LEVELS[level])
        if len(parts) == 1:
            return units(piece, level + 1)
        out, seps = [], []
        for i, p in enumerate(parts):
            sub, sub_seps = units(p, level + 1)
            if i > 0:
                seps.append(level)
            out += sub
            seps += sub_seps
        return out, seps

    if not text:
        return [], [], []
    found, seps = units(text, 0)
    return [a for a, _ in found], [n for _, n in found], seps


def _key(level: int, atom: str) -> tuple[int, int]:
    return level, zlib.crc32(atom.encode("utf-8", "surrogatepass"))


def winnow(positions: list[int], keys: list[tuple[int, int]], window: int) -> list[int]:
    """Indices of the boundaries chosen: for every window ``(x, x + window]`` with ``x`` = 0 or a
    boundary position, the boundary of least key inside it (the rightmost among equals)."""
    chosen: set[int] = set()
    dq: deque[int] = deque()  # boundary indices in the window, keys increasing (non-strictly from right)
    hi = 0
    for x in [0, *positions]:
        while hi < len(positions) and positions[hi] <= x + window:
            while dq and keys[dq[-1]] >= keys[hi]:  # the rightmost wins ties: drop equal keys on the left
                dq.pop()
            dq.append(hi)
            hi += 1
        while dq and positions[dq[0]] <= x:
            dq.popleft()
        if dq:
            chosen.add(dq[0])
    return sorted(chosen)


def stable_rule_cuts(text: str, max_tokens: int, count: Callable[[str], int]) -> list[int]:
    """Char offsets of the content-defined rule cuts of ``text`` (see the module docstring)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise SegmenterInputError(f"max_tokens must be a positive int, got {max_tokens!r}")
    parts, counts, levels = atoms(text, max_tokens, count)
    if len(parts) < 2:
        return []
    positions, chars = [], []
    p = c = 0
    for a, n in zip(parts[:-1], counts[:-1]):
        p, c = p + n, c + len(a)
        positions.append(p)
        chars.append(c)
    keys = [_key(lv, a) for lv, a in zip(levels, parts[:-1])]
    return [chars[i] for i in winnow(positions, keys, max_tokens)]


def stable_rule_segments(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Blocks of ``text`` (concatenating back to it) of at most ``max_tokens`` by ``count``, cut
    where the text near each cut says, not where the text starts. A whitespace-only block joins
    the block before it."""
    if not text:
        return []
    cuts = stable_rule_cuts(text, max_tokens, count)
    bounds = [0, *cuts, len(text)]
    blocks: list[str] = []
    for a, b in zip(bounds, bounds[1:]):
        if blocks and not text[a:b].strip():
            blocks[-1] += text[a:b]
        else:
            blocks.append(text[a:b])
    return blocks


def rule_interior(text: str, max_tokens: int, count: Callable[[str], int]) -> list[int]:
    """Boundary char offsets of ``text`` (cut or not) in its interior: each is cut, or not cut,
    identically wherever ``text`` is placed inside a longer text. They are the boundaries within
    ``max_tokens`` tokens of nothing but ``text``'s paragraphs other than its first and last."""
    parts, counts, levels = atoms(text, max_tokens, count)
    positions, chars = [], []
    p = c = 0
    for a, n in zip(parts[:-1], counts[:-1]):
        p, c = p + n, c + len(a)
        positions.append(p)
        chars.append(c)
    paragraph = [positions[i] for i, lv in enumerate(levels) if lv == 0]
    if len(paragraph) < 2:
        return []
    lo, hi = paragraph[0], paragraph[-1]
    return [ch for pos, ch in zip(positions, chars) if pos - max_tokens >= lo and pos + max_tokens <= hi]
