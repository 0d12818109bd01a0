"""Learned segmentation of long text into blocks for block attention (DESIGN.md section 5).

Public API::

    from vllm_blockattn.segmenter import segment_text, to_block_prompt
    blocks = segment_text(text, model="ckpt/", threshold=[0.3, 0.5], depth=2)
    ids = to_block_prompt(blocks, "Question: ...", tokenizer)
"""

from .api import (
    DEFAULT_MODEL, load_segmenter, segment_cuts, segment_cuts_many, segment_text, thresholds_for, to_block_prompt,
)
from .candidates import DEFAULT_PATTERN, SegmenterInputError, as_text, cuts_of, find_candidates, split_at
from .model import DEFAULT_BACKBONE, Segmenter, SegmenterConfig

__all__ = [
    "DEFAULT_BACKBONE", "DEFAULT_MODEL", "DEFAULT_PATTERN", "Segmenter", "SegmenterConfig",
    "SegmenterInputError", "as_text", "cuts_of", "find_candidates", "load_segmenter", "segment_cuts",
    "segment_cuts_many", "segment_text", "split_at", "thresholds_for", "to_block_prompt",
]
