"""Paired bootstrap intervals for the ablation study (``train/ablation_study.py``).

A *unit* is one (teacher seed, student seed) pair: every arm trained from that teacher with that student
seed saw the same training samples in the same order, and is scored on the same held-out questions of that
teacher. The difference "arm minus reference" is therefore paired on the unit and on the question. One
bootstrap replicate resamples, for every teacher seed separately, its student seeds (with replacement) and
its questions (with replacement, one draw shared by all of that teacher's units and by both arms), and takes
the mean over the resampled units of the per-unit difference of question means. The 95% interval is the
2.5 and 97.5 percentiles of the replicates. With one teacher seed it is an ordinary paired two-level
bootstrap; teacher seeds are strata, not resampled (two are too few to resample).
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap(arm: dict, ref: dict, *, reps: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean difference ``arm - ref`` and its bootstrap interval.

    Args:
        arm, ref: ``{(teacher_seed, student_seed): per-question values}`` (sequences of floats; the two arms'
            sequences of a unit, and all units of one teacher seed, have the same length and question order).
            Only units present in both are used.
        reps: bootstrap replicates.
        level: coverage of the interval.

    Returns:
        ``{"diff", "lo", "hi", "n_units", "n_teachers", "n_questions"}`` (``diff`` is the point estimate:
        the mean over units of the difference of question means); ``None`` values when no unit is shared.
    """
    units = sorted(set(arm) & set(ref))
    if not units:
        return {"diff": None, "lo": None, "hi": None, "n_units": 0, "n_teachers": 0, "n_questions": 0}
    by_teacher: dict = {}
    for u in units:
        d = np.asarray(arm[u], dtype=float) - np.asarray(ref[u], dtype=float)
        by_teacher.setdefault(u[0], []).append(d)
    strata = []
    for t, diffs in sorted(by_teacher.items()):
        if len({len(d) for d in diffs}) != 1:
            raise ValueError(f"teacher seed {t}: units have different numbers of questions")
        strata.append(np.stack(diffs))  # [units, questions]
    point = float(np.mean([d.mean() for s in strata for d in s]))
    rng = np.random.default_rng(seed)
    n_units = sum(s.shape[0] for s in strata)
    stats = np.empty(reps)
    for r in range(reps):
        total = 0.0
        for s in strata:
            rows = rng.integers(0, s.shape[0], s.shape[0])
            cols = rng.integers(0, s.shape[1], s.shape[1])
            total += s[np.ix_(rows, cols)].mean(1).sum()
        stats[r] = total / n_units
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return {"diff": point, "lo": float(lo), "hi": float(hi), "n_units": n_units, "n_teachers": len(strata),
            "n_questions": int(sum(s.shape[1] for s in strata))}


def mean_interval(values: dict, *, reps: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The same bootstrap for one arm's mean (``values`` as ``arm`` above, against zero)."""
    zeros = {u: np.zeros(len(v)) for u, v in values.items()}
    out = paired_bootstrap(values, zeros, reps=reps, seed=seed, level=level)
    return {"mean": out["diff"], "lo": out["lo"], "hi": out["hi"], "n_units": out["n_units"]}
