"""Segmentation scores over char offsets: boundary precision/recall/F1, Pk and WindowDiff.

Cuts are char offsets (a block starts at ``text[c]``). Boundary matching allows a tolerance of
``tol`` chars, one-to-one (a predicted cut matches at most one true cut), so methods that cut at
arbitrary tokens (the random, average, punctuation and LM baselines) are not judged by exact
character equality alone. Pk (Beeferman et al., 1999) and WindowDiff (Pevzner and Hearst, 2002) use
chars as units and a window of half the mean true block length; lower is better.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def boundary_counts(pred: Sequence[int], gold: Sequence[int], tol: int = 0) -> tuple[int, int, int]:
    """(matched, predicted, gold) with greedy one-to-one matching of cuts at most ``tol`` apart."""
    gold_left = sorted(gold)
    used = [False] * len(gold_left)
    hit = 0
    for p in sorted(pred):
        best, dist = None, tol + 1
        for j, g in enumerate(gold_left):
            if not used[j] and abs(g - p) < dist:
                best, dist = j, abs(g - p)
        if best is not None:
            used[best] = True
            hit += 1
    return hit, len(pred), len(gold_left)


def prf(hit: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = hit / n_pred if n_pred else float(n_gold == 0)
    r = hit / n_gold if n_gold else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _counts(cuts: Sequence[int], n: int) -> np.ndarray:
    marks = np.zeros(n + 1, dtype=np.int64)
    for c in cuts:
        marks[c] = 1
    return np.cumsum(marks)


def pk_windowdiff(pred: Sequence[int], gold: Sequence[int], n: int, k: int | None = None) -> tuple[float, float]:
    """Pk and WindowDiff of ``pred`` against ``gold`` over a text of ``n`` chars."""
    if n < 2:
        return 0.0, 0.0
    if k is None:
        k = max(1, round(n / (len(gold) + 1) / 2))
    k = min(k, n - 1)
    cr, ch = _counts(gold, n), _counts(pred, n)
    ref = cr[k:n] - cr[: n - k]  # boundaries in (i, i+k]
    hyp = ch[k:n] - ch[: n - k]
    return float(np.mean((ref > 0) != (hyp > 0))), float(np.mean(ref != hyp))


def evaluate(items: Iterable[tuple[str, Sequence[int], Sequence[int], int]], tol: int = 3) -> dict[str, dict]:
    """Scores per category and over all items.

    Args:
        items: ``(category, predicted cuts, gold cuts, text length)``.
        tol: boundary tolerance in chars.

    Returns:
        ``{category: {"precision", "recall", "f1", "pk", "windowdiff", "n"}}`` plus ``"all"``; F1 is
        micro-averaged over boundaries, Pk/WindowDiff are means over texts.
    """
    acc: dict[str, list] = {}
    for cat, pred, gold, n in items:
        hit, npred, ngold = boundary_counts(pred, gold, tol)
        pk, wd = pk_windowdiff(pred, gold, n)
        for key in (cat, "all"):
            a = acc.setdefault(key, [0, 0, 0, [], []])
            a[0] += hit
            a[1] += npred
            a[2] += ngold
            a[3].append(pk)
            a[4].append(wd)
    out = {}
    for key, (hit, npred, ngold, pks, wds) in acc.items():
        p, r, f = prf(hit, npred, ngold)
        out[key] = {"precision": p, "recall": r, "f1": f, "pk": float(np.mean(pks)),
                    "windowdiff": float(np.mean(wds)), "n": len(pks)}
    return out
