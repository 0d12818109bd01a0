"""Granularity settings of automatic segmentation and their checks, shared by the segmenter, the API
server's settings and the ``vllm_blockattn.segment`` command (no torch, no vLLM).

Granularity is a cut threshold per level and a depth (levels of recursive cutting). A threshold given
as one number applies to every level; a list gives one per level. When no threshold is given, the
segmenter checkpoint's own threshold applies (``threshold`` in its ``segmenter_config.json``; the
packaged default model ships 0.8), so the model, not the caller, owns the default.
"""

from __future__ import annotations

from collections.abc import Sequence


class SegmenterInputError(ValueError):
    """Input the segmenter cannot take (binary data, a bad pattern, bad cut positions, bad settings)."""


def check_threshold(value: float, what: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise SegmenterInputError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def thresholds_for(threshold: float | Sequence[float], depth: int | None) -> list[float]:
    """One threshold per level: a number applies to every level; a list must have ``depth`` entries
    (``depth=None`` takes its length)."""
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise SegmenterInputError(f"depth must be a positive int, got {depth!r}")
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        values = [threshold] * (depth or 1)
    else:
        values = list(threshold)
        if not values:
            raise SegmenterInputError("threshold list is empty; give one threshold per level")
        if depth is not None and depth != len(values):
            raise SegmenterInputError(f"depth {depth} needs {depth} thresholds, got {len(values)}: {values}")
    return [check_threshold(v, f"threshold of level {i + 1}") for i, v in enumerate(values)]
