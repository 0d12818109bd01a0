"""Candidate cut points, text checks and the char-offset view of a segmentation.

A *cut* is a character offset ``c`` with ``0 < c < len(text)``: a new block starts at ``text[c]``.
Candidates are the cuts a rule allows; the default rule puts one after every run of newlines, so a
block always ends with its own line break and the blocks concatenate back to the exact input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..core.segment_settings import SegmenterInputError  # noqa: F401  (re-exported)

DEFAULT_PATTERN = r"\n+"


def as_text(data: str | bytes, what: str = "input") -> str:
    """Return ``data`` as text; bytes must be UTF-8 without NUL bytes (anything else is binary)."""
    if isinstance(data, bytes | bytearray):
        if b"\x00" in data:
            raise SegmenterInputError(f"{what} looks binary (contains NUL bytes); expected UTF-8 text")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SegmenterInputError(f"{what} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(data, str):
        raise SegmenterInputError(f"{what} must be str or bytes, got {type(data).__name__}")
    if "\x00" in data:
        raise SegmenterInputError(f"{what} looks binary (contains NUL characters); expected text")
    return data


def compile_pattern(pattern: str | re.Pattern) -> re.Pattern:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise SegmenterInputError(f"candidate pattern {pattern!r} is not a valid regex: {e}") from None
    if rx.fullmatch(""):
        raise SegmenterInputError(f"candidate pattern {pattern!r} matches the empty string; it must consume text")
    return rx


def find_candidates(text: str, pattern: str | re.Pattern = DEFAULT_PATTERN) -> list[int]:
    """Sorted candidate cuts: the end of every match of ``pattern``, strictly inside the text."""
    rx = compile_pattern(pattern)
    return sorted({m.end() for m in rx.finditer(text) if 0 < m.end() < len(text)})


def check_cuts(text: str, cuts: Sequence[int], what: str = "cuts") -> list[int]:
    """Validate and sort cut offsets: ints, unique, strictly inside ``text``."""
    out = []
    for c in cuts:
        if isinstance(c, bool) or not isinstance(c, int):
            raise SegmenterInputError(f"{what} must be ints, got {c!r}")
        if not 0 < c < len(text):
            raise SegmenterInputError(f"{what}: offset {c} is not inside the text (1..{len(text) - 1})")
        out.append(c)
    if len(set(out)) != len(out):
        raise SegmenterInputError(f"{what} contain duplicates")
    return sorted(out)


def split_at(text: str, cuts: Sequence[int]) -> list[str]:
    """Blocks of ``text`` cut at ``cuts``; ``"".join(result) == text``. Empty text gives ``[]``."""
    if not text:
        return []
    bounds = [0, *check_cuts(text, cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def cuts_of(blocks: Sequence[str]) -> list[int]:
    """Cut offsets of a segmentation given as blocks (the inverse of :func:`split_at`)."""
    out, pos = [], 0
    for b in blocks[:-1]:
        pos += len(b)
        out.append(pos)
    return out


def spread(points: Sequence[int], n: int, length: int) -> list[int]:
    """Pick ``n`` distinct points of the sorted ``points`` nearest to ``n`` equally spaced targets
    over ``[0, length]`` (used by the equal-length baselines and to fill short candidate lists)."""
    points = sorted(set(points))
    if n > len(points):
        raise SegmenterInputError(f"cannot choose {n} cuts from {len(points)} positions")
    chosen: list[int] = []
    taken: set[int] = set()
    for j in range(1, n + 1):
        target = j * length / (n + 1)
        best = min((p for p in points if p not in taken), key=lambda p: (abs(p - target), p))
        taken.add(best)
        chosen.append(best)
    return sorted(chosen)
