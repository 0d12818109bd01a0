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

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence

from .candidates import find_candidates
from .work import checkpoint

MARGIN = 2  # tokens beyond the receptive field, against off-by-one between read-out and piece ends
ROW_OVERHEAD = 100  # bytes per cached candidate besides its feature row (its index entry), for the bound


class PrefixScoreCache:
    """The backbone features of recently scored texts' candidates, keyed by tenant and text;
    :meth:`probs_many` runs the backbone over a suffix only for a text that extends a cached one of
    the same tenant, then the head over all the text's candidates at once, exactly as
    :meth:`Segmenter.candidate_probs` does (so that the probabilities are bit-identical, not only
    close). Thread-safe.

    ``tenant`` is any hashable (the server passes the request's ``cache_salt`` and model): a text
    is found again only under the tenant that sent it, so one client cannot learn from a fast answer
    that another sent a text. Bounded by ``max_entries`` texts and ``max_bytes`` bytes of what it
    stores (feature rows, the text, and the candidate index), least recently used out first."""

    def __init__(self, segmenter, *, max_entries: int = 256, max_bytes: int = 256 << 20):
        self.seg = segmenter
        self.field = segmenter.receptive_field() if hasattr(segmenter, "receptive_field") else None
        self.max_entries, self.max_bytes = max_entries, max_bytes
        # (tenant, text) -> (candidate -> feature row index, feature rows, bytes held)
        self._entries: OrderedDict[tuple, tuple[dict[int, int], object, int]] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()
        self.scored_chars = 0  # characters sent to the model (for tests and metrics)
        self.reused = 0  # candidates whose features came from the cache

    def _longest_prefix(self, tenant, text: str):
        best = None
        with self._lock:
            for key, entry in self._entries.items():
                old = key[1]
                if (key[0] == tenant and len(old) < len(text) and text.startswith(old)
                        and (best is None or len(old) > len(best[0]))):
                    best = (old, entry)
            if best is not None:
                self._entries.move_to_end((tenant, best[0]))
        return best

    def _store(self, tenant, text: str, cands: Sequence[int], feats) -> None:
        key = (tenant, text)
        own = feats.clone()  # not a view: a cached row must not keep a whole batch alive
        size = own.element_size() * own.numel() + sys.getsizeof(text) + ROW_OVERHEAD * len(cands)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = ({c: i for i, c in enumerate(cands)}, own, size)
            self.nbytes += size
            while self._entries and (len(self._entries) > self.max_entries or self.nbytes > self.max_bytes):
                _old, (_rows, _feats, freed) = self._entries.popitem(last=False)
                self.nbytes -= freed

    def _plan(self, tenant, text: str):
        """(candidates, feature rows known so far, suffix start or None to score all, first unknown)."""
        cands = find_candidates(text, self.seg.config.pattern)
        with self._lock:
            same = self._entries.get((tenant, text))
            if same is not None:
                self._entries.move_to_end((tenant, text))
        if same is not None and len(same[0]) == len(cands):  # seen before: nothing to score
            index, feats, _ = same
            return cands, [feats[index[c]] for c in cands], None, len(cands)
        hit = self._longest_prefix(tenant, text) if self.field is not None else None
        if hit is None or not cands:
            return cands, None, None, 0
        old, (old_index, old_feats, _) = hit
        _ids, ends, _ = self.seg.tokenize_pieces(text, cands)
        starts = [0] + [e + 1 for e in ends[:-1]]  # first token of each piece
        # the piece holding the old end may have grown: only pieces wholly before it are unchanged
        last_old = max(i for i, c in enumerate([0, *cands]) if c < len(old))
        stable_end = starts[last_old]  # tokens [0, stable_end) are the same in the old text
        readout = [ends[i + 1] if self.seg.causal else ends[i] for i in range(len(cands))]
        known, first_new = [], 0
        for i, c in enumerate(cands):
            if readout[i] + self.field + MARGIN < stable_end and c in old_index:
                known.append(old_feats[old_index[c]])
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

    def probs_many(self, texts: Sequence[str], tenant=None) -> list[tuple[list[int], list[float]]]:
        """``[segmenter.candidate_probs(t) for t in texts]``, running the backbone only where the
        cache lacks features of ``tenant``'s texts, all the texts' (suffixes') windows in one batch."""
        import torch

        plans = []
        for t in texts:
            checkpoint()
            plans.append(self._plan(tenant, t))
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
            self._store(tenant, t, got_cands, feats)
            out.append((list(got_cands), self.seg.probs_from_features(t, list(got_cands), feats)))
        return out
