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


def text_counts(items: Iterable[tuple[str, Sequence[int], Sequence[int], int]], tol: int = 3) -> list[tuple]:
    """``(category, matched, predicted, gold)`` per text, the unit that the bootstrap resamples."""
    return [(cat, *boundary_counts(pred, gold, tol)) for cat, pred, gold, _n in items]


def _f1_of(counts: np.ndarray) -> np.ndarray:
    """Micro F1 from summed ``(..., 3)`` counts (matched, predicted, gold), as :func:`prf` computes it."""
    hit, npred, ngold = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(npred > 0, hit / np.maximum(npred, 1), (ngold == 0).astype(float))
        r = np.where(ngold > 0, hit / np.maximum(ngold, 1), 1.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    return f


def bootstrap_f1(methods: dict[str, list[tuple]], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> dict[str, dict[str, dict]]:
    """Percentile bootstrap intervals of micro boundary F1 over texts, per category, and of the mean F1
    over categories (``"mean"``); with paired differences between methods.

    Args:
        methods: ``{method: text_counts(...)}``; every method must list the same texts in the same
            order (the resampled texts are shared, so differences between methods are paired).
        n_boot: resamples; texts are resampled with replacement within each category.

    Returns:
        ``{method: {category | "mean": {"f1", "lo", "hi"}}}``; and under the key ``"_draws"`` the
        resampled F1 values (``{method: {category: ndarray}}``) for :func:`paired_difference`.
    """
    names = list(methods)
    cats = list(dict.fromkeys(c for c, *_ in methods[names[0]]))
    for m in names:
        if [c for c, *_ in methods[m]] != [c for c, *_ in methods[names[0]]]:
            raise ValueError(f"method {m!r} does not list the same texts as {names[0]!r}")
    rng = np.random.default_rng(seed)
    idx = {c: np.array([i for i, (cc, *_) in enumerate(methods[names[0]]) if cc == c]) for c in cats}
    draws = {c: rng.integers(0, len(idx[c]), size=(n_boot, len(idx[c]))) for c in cats}
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out: dict = {"_draws": {}}
    for m in names:
        arr = np.array([row[1:] for row in methods[m]], dtype=np.float64)
        res, per_draw = {}, {}
        for c in cats:
            rows = arr[idx[c]]
            point = float(_f1_of(rows.sum(0)))
            boot = _f1_of(rows[draws[c]].sum(1))
            per_draw[c] = boot
            res[c] = {"f1": point, "lo": float(np.percentile(boot, lo_q)), "hi": float(np.percentile(boot, hi_q)),
                      "n": int(len(idx[c]))}
        mean_boot = np.mean([per_draw[c] for c in cats], axis=0)
        per_draw["mean"] = mean_boot
        res["mean"] = {"f1": float(np.mean([res[c]["f1"] for c in cats])), "lo": float(np.percentile(mean_boot, lo_q)),
                       "hi": float(np.percentile(mean_boot, hi_q)), "n": int(sum(len(idx[c]) for c in cats))}
        out[m] = res
        out["_draws"][m] = per_draw
    return out


def paired_difference(boot: dict, a: str, b: str, level: float = 0.95) -> dict[str, dict]:
    """F1 of method ``a`` minus method ``b`` per category (and ``"mean"``) with the percentile interval
    of the paired bootstrap difference (the same resampled texts for both). From
    :func:`cluster_bootstrap_f1`, a category whose interval is not estimable (too few clusters) gets
    ``lo``/``hi`` ``None`` and ``"estimable": False``, as does ``"mean"`` then."""
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for c, da in boot["_draws"][a].items():
        d = da - boot["_draws"][b][c]
        out[c] = {"diff": boot[a][c]["f1"] - boot[b][c]["f1"], "lo": float(np.percentile(d, lo_q)),
                  "hi": float(np.percentile(d, hi_q))}
        if "estimable" in boot[a][c]:
            out[c]["estimable"] = boot[a][c]["estimable"]
            if not out[c]["estimable"]:
                out[c]["lo"] = out[c]["hi"] = None
    return out


def cluster_weights(clusters: Sequence, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Two-stage cluster bootstrap as resampling weights: ``(n_boot, len(clusters))`` counts of how
    often each item is drawn. Each resample draws as many clusters as there are, with replacement, then
    within every drawn cluster as many of its items as it has, with replacement (a cluster drawn twice
    gets two independent draws of its items). Every item its own cluster gives the ordinary bootstrap;
    identical clusters give the ordinary bootstrap over the pooled items."""
    ids = list(dict.fromkeys(clusters))
    members = [np.array([i for i, c in enumerate(clusters) if c == g]) for g in ids]
    k = len(ids)
    w = np.zeros((n_boot, len(clusters)), dtype=np.int64)
    times = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)  # (n_boot, k): draws of each cluster
    for g, idx in enumerate(members):
        m = len(idx)
        # t independent draws of m items from m = one multinomial of t*m items over the m
        w[:, idx] = rng.multinomial(times[:, g] * m, np.full(m, 1.0 / m))
    return w


def cluster_bootstrap_f1(methods: dict[str, list[tuple]], clusters: Sequence, *, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95, min_clusters: int = 2) -> dict[str, dict[str, dict]]:
    """Like :func:`bootstrap_f1`, with texts grouped into clusters (e.g. the source document each text
    is a window of): per category, a two-stage bootstrap (:func:`cluster_weights`) resamples the
    clusters, then the texts within each drawn cluster, so that texts of one document, which are not
    independent, do not count as independent evidence. The resampled texts are shared by all methods
    (paired differences: :func:`paired_difference`).

    Args:
        methods: ``{method: text_counts(...)}``, every method over the same texts in the same order.
        clusters: the cluster id of every text, in that order.
        min_clusters: a category with fewer clusters has no interval (``lo``/``hi`` ``None``,
            ``"estimable": False``): from one cluster the spread between clusters cannot be estimated
            (the two-stage draws then only resample texts, the too-narrow interval this replaces).
            Two clusters give an interval, but one that rests on two values; callers should say so.

    Returns:
        ``{method: {category | "mean": {"f1", "lo", "hi", "n", "clusters", "estimable"}}}`` and
        ``"_draws"`` as :func:`bootstrap_f1`. ``"mean"`` (the mean F1 over categories) is estimable
        only when every category is.
    """
    names = list(methods)
    cats_of = [c for c, *_ in methods[names[0]]]
    for m in names:
        if [c for c, *_ in methods[m]] != cats_of:
            raise ValueError(f"method {m!r} does not list the same texts as {names[0]!r}")
    if len(clusters) != len(cats_of):
        raise ValueError(f"{len(clusters)} cluster ids for {len(cats_of)} texts")
    cats = list(dict.fromkeys(cats_of))
    rng = np.random.default_rng(seed)
    idx = {c: np.array([i for i, cc in enumerate(cats_of) if cc == c]) for c in cats}
    weights = {c: cluster_weights([clusters[i] for i in idx[c]], n_boot, rng) for c in cats}
    n_clusters = {c: len(set(clusters[i] for i in idx[c])) for c in cats}
    ok = {c: n_clusters[c] >= min_clusters for c in cats}
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out: dict = {"_draws": {}}
    for m in names:
        arr = np.array([row[1:] for row in methods[m]], dtype=np.float64)
        res, per_draw = {}, {}
        for c in cats:
            rows = arr[idx[c]]
            boot = _f1_of(weights[c] @ rows)
            per_draw[c] = boot
            res[c] = {"f1": float(_f1_of(rows.sum(0))),
                      "lo": float(np.percentile(boot, lo_q)) if ok[c] else None,
                      "hi": float(np.percentile(boot, hi_q)) if ok[c] else None,
                      "n": int(len(idx[c])), "clusters": n_clusters[c], "estimable": ok[c]}
        mean_boot = np.mean([per_draw[c] for c in cats], axis=0)
        per_draw["mean"] = mean_boot
        all_ok = all(ok.values())
        res["mean"] = {"f1": float(np.mean([res[c]["f1"] for c in cats])),
                       "lo": float(np.percentile(mean_boot, lo_q)) if all_ok else None,
                       "hi": float(np.percentile(mean_boot, hi_q)) if all_ok else None,
                       "n": int(len(cats_of)), "clusters": int(sum(n_clusters.values())), "estimable": all_ok}
        out[m] = res
        out["_draws"][m] = per_draw
    return out
