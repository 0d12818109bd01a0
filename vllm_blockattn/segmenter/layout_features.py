"""Layout features of candidate cuts: what a word-piece tokenizer throws away.

BERT-style tokenizers (all-MiniLM-L6-v2's included) drop newlines and indentation, so a frozen encoder
cannot tell a blank line from a line break or a top-level ``def`` from a nested one. A segmenter
with ``SegmenterConfig.layout=True`` appends these few 0/1 features of the lines around each candidate
to the backbone state its head reads. Every feature reads only the line before and the line after the
candidate (and, for the speaker change, the nearest earlier speaker line within a few lines), so a
cut's features do not depend on where the text starts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .work import checkpoint

NAMES = (
    "one_newline", "two_newlines", "three_or_more_newlines",
    "next_indent0", "prev_indent0",
    "next_heading", "next_toplevel_def", "next_speaker", "speaker_change",
    "next_fence", "prev_fence", "prev_ends_sentence", "next_short", "prev_short", "next_list_item",
    "next_upper", "prev_heading",
)
NUM_LAYOUT_FEATURES = len(NAMES)

_ATX = re.compile(r"#{1,6}[ \t]+\S")
_UNDERLINE = re.compile(r"([=\-~^*#\"+'`:.<>_])\1{2,}[ \t]*$")
_DEF = re.compile(r"(async[ \t]+def|def|class)[ \t]+\w|@\w")
_SPEAKER = re.compile(r"([A-Z][\w.' -]{0,30}?):[ \t]")
_FENCE = re.compile(r"[ \t]*(```|~~~)")
_LIST = re.compile(r"[ \t]*([-*+]|\d+[.)])[ \t]+\S")
SPEAKER_LOOKBACK = 8  # lines
# Bounds on how far back a candidate's features look, so that a text of many blank or whitespace-only
# lines costs linear time, not quadratic (a server segments client text): whitespace before a
# candidate beyond MAX_RUN characters, and lines beyond MAX_SCAN_LINES, are not read. Ordinary text
# never reaches them (the newline-count features saturate at 3).
MAX_RUN = 256
MAX_SCAN_LINES = 64


def _line_at(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start:] if end < 0 else text[start:end]


def _prev_lines(text: str, end: int, n: int) -> list[str]:
    """Up to ``n`` non-blank lines ending before ``end``, nearest first."""
    out = []
    pos = end
    for _ in range(MAX_SCAN_LINES):
        if pos <= 0 or len(out) >= n:
            break
        a = text.rfind("\n", 0, pos - 1) + 1 if pos > 1 else 0
        ln = text[a:pos].rstrip("\n")
        if ln.strip():
            out.append(ln)
        if a == 0:
            break
        pos = a
    return out


def layout_features(text: str, candidates: Sequence[int]) -> torch.Tensor:
    """``[len(candidates), NUM_LAYOUT_FEATURES]`` float features (see :data:`NAMES`)."""
    rows = []
    for k, c in enumerate(candidates):
        if k % 64 == 63:
            checkpoint()
        run_start, floor = c, max(c - MAX_RUN, 0)
        while run_start > floor and text[run_start - 1] in "\n \t\r":
            run_start -= 1
        newlines = text.count("\n", run_start, c)
        nxt = _line_at(text, c)
        after = _line_at(text, c + len(nxt) + 1) if c + len(nxt) + 1 <= len(text) else ""
        prev = _prev_lines(text, run_start + 1 if run_start < c else c, SPEAKER_LOOKBACK)
        p0 = prev[0] if prev else ""
        sp_prev = next((m for m in (_SPEAKER.match(ln) for ln in prev) if m), None)
        # a "Name: " line is a speaker turn only inside a run of such lines (not one prose line that
        # happens to start with a word and a colon)
        sp_next = _SPEAKER.match(nxt) if (sp_prev or _SPEAKER.match(after)) else None
        p1 = prev[1] if len(prev) > 1 else ""
        prev_heading = bool(_ATX.match(p0)) or (bool(_UNDERLINE.match(p0)) and bool(p1.strip()))
        heading = bool(_ATX.match(nxt)) or (bool(nxt.strip()) and not nxt[0].isspace() and bool(_UNDERLINE.match(after))
                                            and len(after.rstrip()) >= len(nxt.strip())) or bool(_UNDERLINE.match(nxt))
        rows.append([
            newlines == 1, newlines == 2, newlines >= 3,
            bool(nxt) and not nxt[0].isspace(), bool(p0) and not p0[0].isspace(),
            heading, bool(_DEF.match(nxt)), bool(sp_next),
            bool(sp_next) and bool(sp_prev) and sp_next.group(1) != sp_prev.group(1),
            bool(_FENCE.match(nxt)), bool(_FENCE.match(p0)), p0.rstrip().endswith((".", "!", "?", ":", ")")),
            len(nxt.strip()) < 40, len(p0.strip()) < 40, bool(_LIST.match(nxt)), nxt[:1].isupper(),
            prev_heading,
        ])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(candidates), NUM_LAYOUT_FEATURES)
