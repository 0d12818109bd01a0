"""Learned segmentation of long text into blocks for block attention.

A pretrained backbone (the packaged offline MiniLM by default) reads the text; a small head (Linear ->
ReLU -> Linear -> 2 classes) decides, for every candidate cut point that a rule inserts (line
breaks), whether to cut there. Granularity is a probability threshold per level and a recursion depth
(each level re-cuts the blocks of the level above). docs/segmenter.md has the design and evidence.

Public API::

    from vllm_blockattn.segmenter import segment_text, to_block_prompt
    blocks = segment_text(text, model="ckpt/", threshold=[0.3, 0.5], depth=2)
    ids = to_block_prompt(blocks, "Question: ...", tokenizer)
"""

from .api import (
    DEFAULT_MODEL, PROSE_MODEL, load_segmenter, segment_cuts, segment_cuts_many, segment_text, thresholds_for,
    to_block_prompt,
)
from .candidates import DEFAULT_PATTERN, SegmenterInputError, as_text, cuts_of, find_candidates, split_at
from .model import DEFAULT_BACKBONE, Segmenter, SegmenterConfig

__all__ = [
    "DEFAULT_BACKBONE", "DEFAULT_MODEL", "DEFAULT_PATTERN", "PROSE_MODEL", "Segmenter", "SegmenterConfig",
    "SegmenterInputError", "as_text", "cuts_of", "find_candidates", "load_segmenter", "segment_cuts",
    "segment_cuts_many", "segment_text", "split_at", "thresholds_for", "to_block_prompt",
]
