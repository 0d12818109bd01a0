"""Public API: text in, blocks out, at a chosen granularity; and blocks to a block prompt.

Granularity is a threshold per level and a recursion depth. Level 1 scores the candidates of the whole
text and cuts where the cut probability reaches ``thresholds[0]``; level 2 scores every level-1 block
on its own (as a new text) and cuts it where the probability reaches ``thresholds[1]``; and so on.
A deeper segmentation therefore always refines a shallower one, and the model runs in eval mode
without sampling, so the same text always gives the same blocks.

Reuse-stable: with the model's content-defined windows (``windowing="content"``, the default) a
candidate's probability depends only on the text within the model's receptive field, so a document
placed inside a longer text is cut exactly as on its own in its interior (level 1; a deeper level
re-cuts a level-1 block identically whenever that block is identical), whatever precedes or follows
it (docs/auto_segmentation.md, :mod:`.stability`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

from ..core.layout import DEFAULT_NUM_SINKS, SINK_TOKEN, BlockSettings, build_block_prompt, build_block_text
from ..core.segment_settings import SegmenterInputError, check_threshold, thresholds_for  # noqa: F401  (re-exported)
from .candidates import as_text, split_at
from .model import Segmenter, resolve_backbone
from .work import checkpoint

# A head trained by train/segmenter_demo.py on the offline MiniLM backbone, shipped with the package.
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
# the head retrained with public-domain prose (issue 24); not the default: see docs/segmenter.md
PROSE_MODEL = Path(__file__).resolve().parent / "prose_model"


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Segmenter:
    return Segmenter.from_pretrained(path)


def load_segmenter(model: str | os.PathLike | Segmenter | None = None) -> Segmenter:
    """A segmenter object from a checkpoint path (cached), a ``pkg:<module>/<dir>`` reference to a
    checkpoint inside an installed package (``pkg:vllm_blockattn.segmenter/prose_model``), an object, or
    None for the default."""
    if isinstance(model, Segmenter):
        return model
    if isinstance(model, str) and model.startswith("pkg:"):
        model = resolve_backbone(model)
    if model is None:
        if not (DEFAULT_MODEL / "segmenter_config.json").is_file():
            raise FileNotFoundError(
                f"no default segmenter at {DEFAULT_MODEL}; pass model=PATH of a checkpoint "
                f"(train one with train/segmenter.py or train/segmenter_demo.py)"
            )
        model = DEFAULT_MODEL
    return _load(os.path.abspath(model))


def _merge_blank(text: str, cuts: list[int]) -> list[int]:
    """Drop cuts that would leave a whitespace-only block (it would tokenize to nothing in some
    tokenizers and carries no content); such a block joins its neighbour. Local: a cut is dropped
    when the text up to the next cut is blank. A blank block joins the block before it; blank blocks
    at the start join the first block that has content. One pass (linear in the text)."""
    bounds = [0, *cuts, len(text)]
    blank = [not text[a:b].strip() for a, b in zip(bounds, bounds[1:])]
    out = []
    leading_blank = blank[0]  # everything before the current cut is whitespace
    for k, c in enumerate(cuts):  # cut k separates block k from block k + 1
        if leading_blank:
            leading_blank = blank[k + 1]  # the blank start joins block k + 1
        elif not blank[k + 1]:
            out.append(c)
    return out


def segment_cuts(text: str, segmenter: Segmenter, thresholds: Sequence[float]) -> list[int]:
    """Cut offsets of ``text`` after ``len(thresholds)`` levels of recursive segmentation."""
    cuts: set[int] = set()
    spans = [(0, text)]
    for th in thresholds:
        nxt = []
        for off, piece in spans:
            checkpoint()
            cands, probs = segmenter.candidate_probs(piece)
            local = [c for c, p in zip(cands, probs) if p >= th]
            cuts.update(off + c for c in local)
            bounds = [0, *local, len(piece)]
            nxt.extend((off + a, piece[a:b]) for a, b in zip(bounds, bounds[1:]))
        spans = nxt
    return _merge_blank(text, sorted(cuts))


def segment_cuts_many(texts: Sequence[str], segmenter: Segmenter, thresholds: Sequence[float]) -> list[list[int]]:
    """:func:`segment_cuts` of several texts, each level's spans of every text scored in one batch
    (:meth:`Segmenter.candidate_probs_many`; a window shared by several texts runs once). Equal to
    ``[segment_cuts(t, segmenter, thresholds) for t in texts]`` with content windows."""
    cuts: list[set[int]] = [set() for _ in texts]
    spans = [[(0, t)] if t else [] for t in texts]
    for th in thresholds:
        checkpoint()
        flat = [(i, off, piece) for i, sp in enumerate(spans) for off, piece in sp]
        scored = segmenter.candidate_probs_many([piece for _i, _off, piece in flat])
        nxt: list[list[tuple[int, str]]] = [[] for _ in texts]
        for (i, off, piece), (cands, probs) in zip(flat, scored):
            local = [c for c, p in zip(cands, probs) if p >= th]
            cuts[i].update(off + c for c in local)
            bounds = [0, *local, len(piece)]
            nxt[i].extend((off + a, piece[a:b]) for a, b in zip(bounds, bounds[1:]))
        spans = nxt
    return [_merge_blank(t, sorted(c)) for t, c in zip(texts, cuts)]


def segment_cuts_thresholds(texts: Sequence[str], segmenter: Segmenter,
                            thresholds: Sequence[float]) -> dict[float, list[list[int]]]:
    """One-level cuts of every text at each of several thresholds, from one scoring pass:
    ``{th: segment_cuts_many(texts, segmenter, [th])}`` at the cost of a single threshold."""
    for th in thresholds:
        check_threshold(th)
    scored = segmenter.candidate_probs_many([t for t in texts if t])
    it = iter(scored)
    per_text = [next(it) if t else ([], []) for t in texts]
    return {th: [cuts_at(t, cands, probs, th) for t, (cands, probs) in zip(texts, per_text)] for th in thresholds}


def cuts_at(text: str, candidates: Sequence[int], probs: Sequence[float], threshold: float) -> list[int]:
    """One level's cuts: the candidates whose probability reaches ``threshold``, whitespace-only
    blocks merged into their neighbour."""
    return _merge_blank(text, [c for c, p in zip(candidates, probs) if p >= threshold])


def segment_text(
    text: str | bytes,
    model: str | os.PathLike | Segmenter | None = None,
    threshold: float | Sequence[float] | None = None,
    depth: int | None = None,
) -> list[str]:
    """Cut ``text`` into blocks whose concatenation is exactly ``text``.

    Args:
        text: str, or UTF-8 bytes. Binary data (NUL bytes, invalid UTF-8) raises
            :class:`SegmenterInputError`.
        model: a segmenter checkpoint path, a :class:`Segmenter`, or None for the packaged default.
        threshold: cut probability threshold, one number for every level or one per level; None takes
            the checkpoint's own threshold (``SegmenterConfig.threshold``, tuned on validation data for
            the packaged default; docs/segmenter.md) for every level. Lower gives more, smaller blocks.
            As in the paper, a deeper level takes a threshold at least as high as the level above.
        depth: recursion depth (levels); None means 1 for a number, ``len(threshold)`` for a list.

    Returns:
        ``[]`` for empty text; ``[text]`` when the text has no candidate cut point (or no candidate
        reaches the threshold); otherwise the blocks in order.
    """
    text = as_text(text, "text")
    if threshold is not None:
        thresholds = thresholds_for(threshold, depth)
    if not text:
        thresholds_for(0.5, depth)  # still reject a bad depth
        return []
    seg = load_segmenter(model)
    if threshold is None:
        thresholds = thresholds_for(seg.config.threshold, depth)
    return split_at(text, segment_cuts(text, seg, thresholds))


def to_block_prompt(
    blocks: Sequence[str],
    question: str,
    tokenizer=None,
    *,
    settings: BlockSettings | None = None,
    prefix: str | Sequence[int] | None = None,
    as_text: bool = False,
    sink_token: str = SINK_TOKEN,
    num_sinks: int = DEFAULT_NUM_SINKS,
):
    """A block prompt whose context blocks are ``blocks`` and whose final block is ``question``.

    Returns token ids (:func:`vllm_blockattn.core.layout.build_block_prompt`, needs ``tokenizer`` or
    ``settings``), or with ``as_text`` the text form for text-only paths
    (:func:`vllm_blockattn.core.layout.build_block_text`).
    """
    if isinstance(blocks, str):
        raise SegmenterInputError("blocks must be a list of strings, got one string")
    if not question:
        raise SegmenterInputError("question (the final block) must be non-empty text")
    every = [*blocks, question]
    if as_text:
        return build_block_text(every, sink_token=sink_token, num_sinks=num_sinks)
    return build_block_prompt(every, settings, tokenizer=tokenizer, prefix=prefix)
