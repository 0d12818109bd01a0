"""LongBench v1 scorers, written from the definitions in THUDM/LongBench ``metrics.py`` and ``eval.py``.

Every scorer takes one prediction and one reference and returns a float in [0, 1]; a task's score
for a row is the maximum over its references (:func:`score_row`). Behaviour that the official code
has and a clean re-implementation might "fix" is kept on purpose and marked, because scores must be
comparable with published numbers:

- ROUGE-L is the ``rouge`` package's summary-level ROUGE-L (sentences split on ``.``, LCS tokens
  collected into a *set* and words counted as *unique* words), not Google's ``rouge_score``.
- Code similarity is fuzzywuzzy's ``fuzz.ratio`` without python-Levenshtein, i.e. difflib's
  ``SequenceMatcher`` ratio rounded to an integer percentage.
- Chinese metrics tokenise with jieba when it is installed; without it they fall back to one token
  per character (:data:`ZH_TOKENIZER` says which is in use).
- The ``rouge`` package reconstructs each LCS recursively; on long sentence pairs (no ``.`` to split
  them) that overflows Python's recursion limit and LongBench's bare ``except`` scores the row 0.0.
  :func:`rouge_l_score` reproduces that by default (``recursion="official"``); ``recursion="score"``
  scores such rows instead (a documented deviation, ``rouge_recursion`` in the task metadata).
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCTUATION)

try:  # jieba is LongBench's Chinese word segmenter; without it, characters are the tokens.
    import jieba as _jieba

    _jieba.setLogLevel(60)
    ZH_TOKENIZER = "jieba"
except ImportError:  # pragma: no cover - depends on the environment
    _jieba = None
    ZH_TOKENIZER = "chars"


def zh_tokens(text: str) -> list[str]:
    """Chinese word tokens: jieba's precise mode, or single non-space characters without jieba."""
    if _jieba is not None:
        return list(_jieba.cut(text, cut_all=False))
    return [ch for ch in text if not ch.isspace()]


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation, drop articles, collapse spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower case, drop English and Chinese punctuation, remove all whitespace."""
    return "".join(ch for ch in s.lower() if ch not in _ALL_PUNCT and not ch.isspace())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap); 0 when nothing overlaps."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    p, r = same / len(prediction), same / len(reference)
    return 2 * p * r / (p + r)


def qa_f1_score(prediction: str, reference: str) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh_score(prediction: str, reference: str) -> float:
    def toks(text):
        return [t for t in (normalize_zh_answer(w) for w in zh_tokens(text)) if t]

    return token_f1(toks(prediction), toks(reference))


def _lcs_tokens(ref: list[str], hyp: list[str]) -> tuple[list[str], int]:
    """One longest common subsequence of ``ref`` and ``hyp``, traced back the way the ``rouge``
    package does (on a tie it moves along ``hyp``), which decides *which* LCS is returned; and the
    number of calls the package's recursive traceback makes for it (steps + the final call)."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev = table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if ref[i - 1] == hyp[j - 1] else max(prev[j], row[j - 1])
    out, i, j, calls = [], n, m, 1
    while i > 0 and j > 0:
        calls += 1
        if ref[i - 1] == hyp[j - 1]:
            out.append(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1], calls


def _sentences(text: str) -> list[list[str]]:
    # Split on '.', keep pieces of non-zero length, collapse whitespace, then split on single
    # spaces: a whitespace-only piece becomes the one empty word "" (as in the rouge package).
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if len(piece) > 0]


# Deepest recursive LCS traceback (calls of the ``rouge`` package's ``_recon``) that LongBench's
# ``eval.py`` survives at Python's default recursion limit of 1000: measured with rouge 1.0.1 under
# CPython 3.11 at eval.py's call depth (``rouge_zh_score`` adds one frame). One more call raises
# RecursionError, which LongBench's bare ``except`` turns into a score of 0.0.
ROUGE_MAX_RECURSION = 991
ROUGE_ZH_MAX_RECURSION = 990
ROUGE_RECURSION_MODES = ("official", "score")


class _RecursionOverflow(Exception):
    pass


def _check_mode(recursion: str) -> None:
    if recursion not in ROUGE_RECURSION_MODES:
        raise ValueError(f"rouge recursion mode must be one of {ROUGE_RECURSION_MODES}, got {recursion!r}")


def _rouge_l(prediction: str, reference: str, max_calls: int | None) -> float:
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    m = len({w for s in ref for w in s})
    n = len({w for s in hyp for w in s})
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            if max_calls is not None and min(len(r), len(h)) + 1 > max_calls:
                raise _RecursionOverflow  # the shortest traceback is min(len) steps + the last call
            lcs, calls = _lcs_tokens(r, h)
            if max_calls is not None and calls > max_calls:
                raise _RecursionOverflow
            union.update(lcs)
    p, r = len(union) / n, len(union) / m
    return 2.0 * (p * r) / (p + r + 1e-8)


def rouge_l_score(prediction: str, reference: str, recursion: str = "official") -> float:
    """Summary-level ROUGE-L F of the ``rouge`` package (what LongBench's ``rouge_score`` returns).

    The union LCS and both lengths count unique words; an empty prediction or reference scores 0
    (LongBench catches the package's "Hypothesis is empty" error and returns 0). With
    ``recursion="official"`` a sentence pair whose LCS traceback would overflow the package's
    recursion (more than :data:`ROUGE_MAX_RECURSION` calls) scores 0.0 as in LongBench;
    ``recursion="score"`` scores it.
    """
    _check_mode(recursion)
    return _rouge_guarded(prediction, reference, ROUGE_MAX_RECURSION if recursion == "official" else None)


def _rouge_guarded(prediction: str, reference: str, max_calls: int | None) -> float:
    try:
        return _rouge_l(prediction, reference, max_calls)
    except _RecursionOverflow:
        return 0.0


def rouge_zh_score(prediction: str, reference: str, recursion: str = "official") -> float:
    _check_mode(recursion)
    return _rouge_guarded(" ".join(zh_tokens(prediction)), " ".join(zh_tokens(reference)),
                          ROUGE_ZH_MAX_RECURSION if recursion == "official" else None)


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """1/k when the reference is among the k class names found in the prediction, else 0.

    Official quirk kept: class names contained in the reference (but not equal to it) are removed
    from the match list (``list.remove``: its first equal entry) while a ``for`` loop walks over it,
    so the entry that shifts into the current slot is never checked. No class names (an empty
    ``all_classes``) match nothing: 0.0, as in LongBench.
    """
    matches = [c for c in (all_classes or []) if c in prediction]
    i = 0
    while i < len(matches):  # a for loop over a list that shrinks under it
        term = matches[i]
        if term in reference and term != reference:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if reference in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference: str) -> float:
    """Share of the numbers in the prediction that equal the reference count."""
    return _fraction_equal(prediction, str(reference))


def retrieval_score(prediction: str, reference: str) -> float:
    """Share of the numbers in the prediction that equal the paragraph id in ``Paragraph N``."""
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        raise ValueError(f"retrieval reference must look like 'Paragraph N', got {reference!r}")
    return _fraction_equal(prediction, found[0])


def retrieval_zh_score(prediction: str, reference: str) -> float:
    found = re.findall(r"段落(\d+)", reference)
    if not found:
        raise ValueError(f"Chinese retrieval reference must look like '段落N', got {reference!r}")
    return _fraction_equal(prediction, found[0])


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy ``fuzz.ratio`` (pure-Python path): equal strings 100, an empty one 0, else
    ``round(100 * SequenceMatcher(None, a, b).ratio())``."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, reference: str) -> float:
    """Similarity of the first line of the prediction (leading newlines dropped) that holds no
    ``` ` ```, ``#`` or ``//`` to the reference line. As in LongBench, a blank line counts: it is
    taken (and scores ~0) rather than skipped, e.g. after an opening code fence."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, reference) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_l_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "count": count_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "code_sim": code_sim_score,
}

# Tasks whose prediction is cut to its first line before scoring (LongBench eval.py).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score_row(task: str, metric: str, prediction: str, references: Sequence[str],
              all_classes: Sequence[str] | None = None, rouge_recursion: str = "official") -> float:
    """A row's score: the best over its references, after LongBench's first-line rule."""
    if metric not in METRICS:
        raise ValueError(f"unknown LongBench metric {metric!r}; expected one of {sorted(METRICS)}")
    if isinstance(references, str) or not references:
        raise ValueError(f"references must be a non-empty list of strings, got {references!r}")
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = METRICS[metric]
    if metric == "classification":
        return max(fn(prediction, ref, all_classes or []) for ref in references)
    if metric in ("rouge", "rouge_zh"):
        return max(fn(prediction, ref, recursion=rouge_recursion) for ref in references)
    return max(fn(prediction, ref) for ref in references)
