"""Incremental scoring for texts that grow by appending (a chat history, a log, a notes file).

With content-defined windows a candidate's probability depends only on the tokens within the
segmenter's receptive field ``R`` on either side of its read-out token
(:meth:`Segmenter.receptive_field`). When a new text extends a text scored before, every candidate
whose receptive field lies inside the unchanged part keeps its probability, and the rest can be
scored from a suffix of the new text that starts ``R`` tokens before the first of them: the cost of a
turn is then the new turn plus ``2R`` tokens, not the whole history. The cache keeps backbone
features, not probabilities, and the head runs over all of a text's candidates together as in
:meth:`Segmenter.candidate_probs`, so the result is bit-identical to scoring the whole text (a head
run over fewer rows can round differently on some BLAS paths; tested against ``candidate_probs``).

Only the first level uses it; a deeper level scores level-1 blocks, which are texts of their own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from .candidates import find_candidates

MARGIN = 2  # tokens beyond the receptive field, against off-by-one between read-out and piece ends


class PrefixScoreCache:
    """The backbone features of recently scored texts' candidates, keyed by text; :meth:`probs_many`
    runs the backbone over a suffix only for a text that extends a cached one, then the head over all
    the text's candidates at once, exactly as :meth:`Segmenter.candidate_probs` does (so that the
    probabilities are bit-identical, not only close). Thread-safe; at most ``max_entries`` texts
    (least recently used first out) and ``max_chars`` characters in all."""

    def __init__(self, segmenter, *, max_entries: int = 64, max_chars: int = 5_000_000):
        self.seg = segmenter
        self.field = segmenter.receptive_field() if hasattr(segmenter, "receptive_field") else None
        self.max_entries, self.max_chars = max_entries, max_chars
        self._entries: OrderedDict[str, dict[int, object]] = OrderedDict()  # text -> {candidate: feature row}
        self._chars = 0
        self._lock = threading.Lock()
        self.scored_chars = 0  # characters sent to the model (for tests and metrics)
        self.reused = 0  # candidates whose features came from the cache

    def _longest_prefix(self, text: str) -> tuple[str, dict[int, object]] | None:
        best = None
        with self._lock:
            for old, rows in self._entries.items():
                if len(old) < len(text) and text.startswith(old) and (best is None or len(old) > len(best[0])):
                    best = (old, rows)
            if best is not None:
                self._entries.move_to_end(best[0])
        return best

    def _store(self, text: str, cands: Sequence[int], feats) -> None:
        with self._lock:
            if text in self._entries:
                self._entries.move_to_end(text)
                return
            own = feats.clone()  # not a view: a cached row must not keep a whole batch alive
            self._entries[text] = {c: own[i] for i, c in enumerate(cands)}
            self._chars += len(text)
            while self._entries and (len(self._entries) > self.max_entries or self._chars > self.max_chars):
                old, _ = self._entries.popitem(last=False)
                self._chars -= len(old)

    def _plan(self, text: str):
        """(candidates, feature rows known so far, suffix start or None to score all, first unknown)."""
        cands = find_candidates(text, self.seg.config.pattern)
        with self._lock:
            same = self._entries.get(text)
        if same is not None and len(same) == len(cands):  # seen before: nothing to score
            return cands, [same[c] for c in cands], None, len(cands)
        hit = self._longest_prefix(text) if self.field is not None else None
        if hit is None or not cands:
            return cands, None, None, 0
        old, old_rows = hit
        _ids, ends, _ = self.seg.tokenize_pieces(text, cands)
        starts = [0] + [e + 1 for e in ends[:-1]]  # first token of each piece
        # the piece holding the old end may have grown: only pieces wholly before it are unchanged
        last_old = max(i for i, c in enumerate([0, *cands]) if c < len(old))
        stable_end = starts[last_old]  # tokens [0, stable_end) are the same in the old text
        readout = [ends[i + 1] if self.seg.causal else ends[i] for i in range(len(cands))]
        known, first_new = [], 0
        for i, c in enumerate(cands):
            if readout[i] + self.field + MARGIN < stable_end and c in old_rows:
                known.append(old_rows[c])
                first_new = i + 1
            else:
                break
        if first_new == len(cands):
            return cands, known, None, first_new
        # the suffix starts at a piece boundary (a candidate) R + MARGIN tokens before the first
        # unknown candidate's read-out, so that every token its probability can see is in the suffix
        limit = readout[first_new] - self.field - MARGIN
        j = max((k for k in range(first_new) if starts[k + 1] <= limit), default=None)
        if j is None:
            return cands, None, None, 0
        return cands, known, cands[j], first_new

    def probs_many(self, texts: Sequence[str]) -> list[tuple[list[int], list[float]]]:
        """``[segmenter.candidate_probs(t) for t in texts]``, running the backbone only where the
        cache lacks features, all the texts' (suffixes') windows in one batch."""
        import torch

        plans = [self._plan(t) for t in texts]
        jobs = [t if known is None else t[start:] for t, (_c, known, start, _f) in zip(texts, plans)
                if known is None or start is not None]
        scored = iter(self.seg.candidate_features_many(jobs) if jobs else [])
        out = []
        for t, (cands, known, start, first_new) in zip(texts, plans):
            if known is None:
                got_cands, feats = next(scored)
                self.scored_chars += len(t)
            else:
                rows = list(known)
                if start is not None:
                    sub_cands, sub_feats = next(scored)
                    self.scored_chars += len(t) - start
                    tail = {start + c: sub_feats[i] for i, c in enumerate(sub_cands)}
                    rows += [tail[c] for c in cands[first_new:]]
                got_cands, feats = cands, torch.stack(rows) if rows else torch.zeros(0, 0)
                self.reused += len(known)
            self._store(t, got_cands, feats)
            out.append((list(got_cands), self.seg.probs_from_features(t, list(got_cands), feats)))
        return out
