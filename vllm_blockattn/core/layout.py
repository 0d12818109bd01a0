"""The block layout protocol shared by every part of vllm-blockattn.

A block prompt is plain token ids::

    [prefix] [S x k] block_1 [S x k] block_2 ... [S x k] block_n

``S`` is the block sink token (``<|block_sink|>``) and ``k`` the number of sinks per group (4).
Every block but the last attends only to itself; the last block (``block_n``, the *final* block, which
also owns every generated token) attends to everything. Tokens before the first sink group, if any,
form a non-final block of their own (e.g. a chat template's prefix). A prompt with no sink group is an
ordinary prompt: a single final block, i.e. plain causal attention.

A block's span includes its own sink group: the sinks are the first tokens the block's queries see,
and a block encoded alone starts with its first sink at position 0.

Non-final blocks may be padded to a multiple of a page size with a pad id (the vLLM plugin does this
so that every KV page belongs to one block). Pad slots take no logical position and are masked.

**Sink-free layout** (``num_sinks=0``), for checkpoints trained without sinks (Block-Attention's
Block-FT models)::

    [prefix] B block_1 B block_2 ... B block_n

``B`` is a *boundary* token (``<|block_boundary|>`` by default): exactly one before every block. It only
marks where a block starts and is removed before attention: it belongs to no block, takes no position,
no query sees it, and the vLLM plugin drops it before the model runs (it never reaches the KV cache).
A block's span is its content alone, so a block encoded alone starts with its first content token at
position 0. Two boundaries in a row (an empty block) or a boundary that ends the prompt are errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SINK_TOKEN = "<|block_sink|>"
BOUNDARY_TOKEN = "<|block_boundary|>"
DEFAULT_NUM_SINKS = 4
CONFIG_KEY = "block_attention"


class BlockLayoutError(ValueError):
    """A block prompt (or the request to build one) does not follow the block layout protocol."""


@dataclass(frozen=True)
class BlockSettings:
    """How block boundaries are marked in token ids.

    Args:
        sink_token_id: id of the sink token (``<|block_sink|>`` for a distilled checkpoint; any existing
            token for the training-free baseline). None in the sink-free layout.
        num_sinks: sinks per group (k); 0 selects the sink-free layout.
        boundary_token_id: the sink-free layout's boundary token (one before every block, removed before
            attention). Only with ``num_sinks=0``.
    """

    sink_token_id: int | None = None
    num_sinks: int = DEFAULT_NUM_SINKS
    boundary_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.num_sinks, bool) or not isinstance(self.num_sinks, int) or self.num_sinks < 0:
            raise BlockLayoutError(f"num_sinks must be a non-negative int, got {self.num_sinks!r}")
        if self.num_sinks == 0:
            if self.sink_token_id is not None:
                raise BlockLayoutError("num_sinks=0 is the sink-free layout: give boundary_token_id, not sink_token_id")
            _check_token_id(self.boundary_token_id, "boundary_token_id (the sink-free layout, num_sinks=0)")
        else:
            if self.boundary_token_id is not None:
                raise BlockLayoutError("boundary_token_id belongs to the sink-free layout: set num_sinks=0")
            _check_token_id(self.sink_token_id, "sink_token_id")

    @property
    def sink_free(self) -> bool:
        """True for the sink-free layout (one boundary token per block, removed before attention)."""
        return self.num_sinks == 0

    @property
    def marker_id(self) -> int:
        """The token id that marks where a block starts: the sink, or the boundary token."""
        return self.boundary_token_id if self.sink_free else self.sink_token_id

    @property
    def group(self) -> list[int]:
        """The ids placed before every block: k sinks, or one boundary token."""
        return [self.marker_id] * (self.num_sinks or 1)

    @property
    def sinks(self) -> list[int]:
        """The ids that start every block's attended span: k sinks, or nothing (sink-free)."""
        return [self.marker_id] * self.num_sinks

    @property
    def marker_name(self) -> str:
        return "boundary token" if self.sink_free else "sink token"

    def to_dict(self) -> dict:
        if self.sink_free:
            return {"num_sinks": 0, "boundary_token_id": self.boundary_token_id}
        return {"sink_token_id": self.sink_token_id, "num_sinks": self.num_sinks}

    @classmethod
    def from_dict(cls, d: dict) -> BlockSettings:
        unknown = set(d) - {"sink_token_id", "num_sinks", "sink_token", "boundary_token_id", "boundary_token"}
        if unknown:
            raise BlockLayoutError(f"unknown block_attention settings: {sorted(unknown)}")
        num_sinks = d.get("num_sinks", DEFAULT_NUM_SINKS)
        if isinstance(num_sinks, bool) or not isinstance(num_sinks, int):
            raise BlockLayoutError(f"num_sinks must be a non-negative int, got {num_sinks!r}")
        if num_sinks == 0:
            if d.get("boundary_token_id") is None:
                raise BlockLayoutError(f"the sink-free layout (num_sinks=0) needs 'boundary_token_id', got {d!r}")
            return cls(num_sinks=0, boundary_token_id=_as_id(d["boundary_token_id"], "boundary_token_id"))
        if "sink_token_id" not in d:
            raise BlockLayoutError(f"block_attention settings need 'sink_token_id', got {d!r}")
        return cls(sink_token_id=_as_id(d["sink_token_id"], "sink_token_id"), num_sinks=num_sinks)

    @classmethod
    def from_tokenizer(cls, tokenizer, sink_token: str = SINK_TOKEN, num_sinks: int = DEFAULT_NUM_SINKS,
                       boundary_token: str = BOUNDARY_TOKEN) -> BlockSettings:
        """Settings for ``tokenizer``, whose vocabulary must hold the marker (``sink_token``, or
        ``boundary_token`` when ``num_sinks=0``) as a single token."""
        vocab = tokenizer.get_vocab()
        if num_sinks == 0:
            if boundary_token not in vocab:
                raise BlockLayoutError(
                    f"boundary token {boundary_token!r} is not in the tokenizer's vocabulary; add it as a special "
                    f"token (`vllm_blockattn.distill.add_boundary_token`) for a checkpoint trained without sinks"
                )
            return cls(num_sinks=0, boundary_token_id=vocab[boundary_token])
        if sink_token not in vocab:
            raise BlockLayoutError(
                f"sink token {sink_token!r} is not in the tokenizer's vocabulary; add it (block distillation "
                f"does) or name an existing token as the marker for the training-free baseline"
            )
        return cls(sink_token_id=vocab[sink_token], num_sinks=num_sinks)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> BlockSettings | None:
        """Read the ``block_attention`` entry of ``path/config.json``; None when the model has none."""
        with open(os.path.join(path, "config.json")) as f:
            entry = json.load(f).get(CONFIG_KEY)
        return None if entry is None else cls.from_dict(entry)


def _check_token_id(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BlockLayoutError(f"{what} must be a non-negative int, got {value!r}")


def _as_id(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BlockLayoutError(f"{what} must be a token id, got {value!r}") from None


@dataclass(frozen=True)
class Block:
    """One block of a prompt, as half-open spans into the token ids.

    ``start`` is the first token of the block (its first sink, or token 0 for a prefix block; in the
    sink-free layout the first token after its boundary token), ``content_start`` the first token after
    its sink group (``== start`` sink-free), ``end`` one past its last real token and ``padded_end`` one
    past its pads (``== end`` when unpadded). Pads only follow non-final blocks.
    """

    start: int
    content_start: int
    end: int
    padded_end: int
    is_final: bool

    @property
    def num_tokens(self) -> int:
        """Real tokens (sinks + content), pads and boundary tokens excluded."""
        return self.end - self.start

    @property
    def num_pads(self) -> int:
        return self.padded_end - self.end


@dataclass(frozen=True)
class BlockLayout:
    """The parsed block structure of one prompt."""

    blocks: tuple[Block, ...]
    num_tokens: int  # all prompt tokens, pads included
    settings: BlockSettings | None = field(default=None, compare=False)

    @property
    def is_block_prompt(self) -> bool:
        """False for an ordinary prompt (one final block): stock causal attention applies."""
        return len(self.blocks) > 1

    @property
    def final(self) -> Block:
        return self.blocks[-1]

    @property
    def context_blocks(self) -> tuple[Block, ...]:
        return self.blocks[:-1]

    def block_index(self) -> list[int]:
        """Block index of every token; -1 for pads and boundary tokens (no query sees them)."""
        out = [-1] * self.num_tokens
        for b, blk in enumerate(self.blocks):
            out[blk.start : blk.end] = [b] * blk.num_tokens
        return out

    def positions(self) -> list[int]:
        """Global logical position of every token (0..N-1 over real tokens).

        A pad (or a sink-free layout's boundary token) repeats the position of the token before it; its
        value never matters because nothing attends to it.
        """
        out, pos, slot = [], 0, 0
        for blk in self.blocks:
            out.extend([max(pos - 1, 0)] * (blk.start - slot))  # a dropped boundary token (sink-free)
            out.extend(range(pos, pos + blk.num_tokens))
            pos += blk.num_tokens
            out.extend([max(pos - 1, 0)] * blk.num_pads)
            slot = blk.padded_end
        return out

    def offsets(self) -> list[int]:
        """Logical offset (global position of the first token) of every block."""
        out, pos = [], 0
        for blk in self.blocks:
            out.append(pos)
            pos += blk.num_tokens
        return out

    @property
    def has_markers_removed(self) -> bool:
        """True when some tokens belong to no block (the sink-free layout's boundary tokens): they are
        removed before attention, also in an otherwise ordinary prompt (``B question``)."""
        return any(blk.start != prev for blk, prev in
                   zip(self.blocks, [0] + [b.padded_end for b in self.blocks[:-1]]))

    def real_token_indices(self) -> list[int]:
        """Indices of the tokens that take part in attention (no pads, no boundary tokens), in order."""
        return [i for blk in self.blocks for i in range(blk.start, blk.end)]


def _check_ids(ids: Sequence[int], what: str) -> list[int]:
    try:
        out = [int(t) for t in ids]
    except (TypeError, ValueError) as e:
        raise BlockLayoutError(f"{what} must be a sequence of token ids: {e}") from None
    return out


def build_block_prompt(
    blocks: Sequence[str | Sequence[int]],
    settings: BlockSettings | None = None,
    *,
    tokenizer=None,
    prefix: str | Sequence[int] | None = None,
    page_size: int | None = None,
    pad_id: int | None = None,
) -> list[int]:
    """Build the token ids of a block prompt.

    Args:
        blocks: the blocks in order, each text (needs ``tokenizer``) or token ids. The last one is the
            final block (question, instruction); all others are context blocks.
        settings: sink token and count; defaults to ``BlockSettings.from_tokenizer(tokenizer)``.
        tokenizer: a Hugging Face tokenizer, for text blocks and the default settings.
        prefix: tokens placed before the first sink group (e.g. a chat template's head or BOS); they
            form a non-final block of their own.
        page_size: with ``pad_id``, pad every non-final block (sinks + content) to a multiple of it.
        pad_id: the pad token id.

    Raises:
        BlockLayoutError: empty block list, an empty block, the sink id inside a block, a missing sink
            token, or inconsistent padding arguments.
    """
    if settings is None:
        if tokenizer is None:
            raise BlockLayoutError("build_block_prompt needs `settings` or a `tokenizer` that has the sink token")
        settings = BlockSettings.from_tokenizer(tokenizer)
    if not blocks:
        raise BlockLayoutError("empty block list: a block prompt needs at least one (final) block")
    if (page_size is None) != (pad_id is None):
        raise BlockLayoutError("padding needs both `page_size` and `pad_id`")
    if page_size is not None and page_size < 1:
        raise BlockLayoutError(f"page_size must be positive, got {page_size}")
    if pad_id is not None and pad_id == settings.marker_id:
        raise BlockLayoutError(f"pad_id must differ from the {settings.marker_name} id")

    def encode(block, what):
        if isinstance(block, str):
            if tokenizer is None:
                raise BlockLayoutError(f"{what} is text; pass a tokenizer to encode it")
            return tokenizer.encode(block, add_special_tokens=False)
        return _check_ids(block, what)

    marker, name = settings.marker_id, settings.marker_name
    pieces: list[list[int]] = []  # one per block, the prefix block first
    if prefix is not None:
        head = encode(prefix, "prefix")
        if marker in head:
            raise BlockLayoutError(f"the prefix contains the {name} id {marker}")
        if head:
            pieces.append(head)
    for i, block in enumerate(blocks):
        what = f"block {i}" + (" (final)" if i == len(blocks) - 1 else "")
        toks = encode(block, what)
        if not toks:
            raise BlockLayoutError(f"{what} is empty")
        if marker in toks:
            raise BlockLayoutError(
                f"{what} contains the {name} id {marker} at offset {toks.index(marker)}; "
                f"the layout adds block markers, not the text"
            )
        pieces.append(settings.group + toks)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        ids.extend(piece)
        if page_size is not None and i < len(pieces) - 1:
            # Pads follow the block's attended span; a dropped boundary token is not part of it.
            attended = len(piece) - (1 if settings.sink_free and piece[0] == marker else 0)
            ids.extend([pad_id] * page_padding(attended, page_size))
    return ids


def page_padding(num_tokens: int, page_size: int) -> int:
    """Pad slots after a non-final block of ``num_tokens`` real tokens so that the next block starts on a
    KV page boundary: the one rule for padding (the block cache, the engine's paged layout and padded
    block prompts all use it). Pads are never content: they take no position and no query sees them."""
    return -num_tokens % page_size


def build_block_text(blocks: Sequence[str], sink_token: str = SINK_TOKEN, num_sinks: int = DEFAULT_NUM_SINKS) -> str:
    """The text form of a block prompt, for paths that only carry text (the OpenAI server, chat
    messages). The marker must be a special token of the tokenizer so that it survives encoding.
    With ``num_sinks=0`` (the sink-free layout) ``sink_token`` is the boundary token, placed once per
    block (e.g. ``build_block_text(docs, BOUNDARY_TOKEN, 0)``)."""
    if not blocks:
        raise BlockLayoutError("empty block list: a block prompt needs at least one (final) block")
    for i, b in enumerate(blocks):
        if not b:
            raise BlockLayoutError(f"block {i} is empty")
        if sink_token in b:
            raise BlockLayoutError(f"block {i} contains the {'sink' if num_sinks else 'boundary'} token {sink_token!r}")
    return "".join(sink_token * (num_sinks or 1) + b for b in blocks)


def parse_block_prompt(
    token_ids: Sequence[int],
    settings: BlockSettings,
    *,
    pad_id: int | None = None,
    page_size: int | None = None,
) -> BlockLayout:
    """Recover the block layout from token ids alone.

    Pads (only with ``pad_id`` and ``page_size``) are the trailing pad ids (fewer than ``page_size``)
    of a page-aligned non-final block; choose a pad id that never ends a block's real content.

    Raises:
        BlockLayoutError: a sink run whose length is not ``num_sinks`` (sink-free: two boundary tokens in
            a row), a marker with no content after it, or an empty prompt.
    """
    try:
        arr = np.asarray(token_ids, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise BlockLayoutError(f"token_ids must be a sequence of token ids: {e}") from None
    if arr.ndim != 1:
        raise BlockLayoutError(f"token_ids must be a flat sequence of token ids, got shape {arr.shape}")
    n = int(arr.shape[0])
    if not n:
        raise BlockLayoutError("empty prompt")
    if (page_size is None) != (pad_id is None):
        raise BlockLayoutError("pad parsing needs both `page_size` and `pad_id`")
    s, k = settings.marker_id, settings.num_sinks or 1
    what = (f"boundary token (id {s}) must be followed by the block's content: two in a row make an empty "
            f"block" if settings.sink_free else
            f"sink group must be exactly {k} sink tokens (id {s}) followed by the block's content")

    # Group starts; every maximal run of marker ids must be exactly k long (vectorized: the parse
    # runs on every prompt in the server's frontend and scheduler).
    edges = np.diff(np.concatenate(([0], (arr == s).astype(np.int8), [0])))
    run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for i, j in zip(run_starts.tolist(), run_ends.tolist()):
        if j - i != k:
            raise BlockLayoutError(f"{'boundary token' if settings.sink_free else 'sink'} run of length {j - i} "
                                   f"at token {i}; every {what}")
        if j == n:
            raise BlockLayoutError(f"{settings.marker_name} at token {i} ends the prompt: the block after it is empty")
    starts = run_starts.tolist()
    if not starts:
        return BlockLayout((Block(0, 0, n, n, True),), n, settings)

    # In the sink-free layout the boundary token belongs to no block: a block starts after it.
    skip = 1 if settings.sink_free else 0
    bounds = ([0] if starts[0] > 0 else []) + starts + [n]
    blocks = []
    for b in range(len(bounds) - 1):
        start, stop = bounds[b], bounds[b + 1]
        is_final = b == len(bounds) - 2
        marked = arr[start] == s
        content_start = start + k if marked else start
        start += skip if marked else 0
        end = stop
        if not is_final and page_size is not None and (stop - start) % page_size == 0:
            # The builder adds fewer than page_size pads; content should not end with the pad id.
            while stop - end < page_size - 1 and end > content_start + 1 and arr[end - 1] == pad_id:
                end -= 1
        blocks.append(Block(start, content_start, end, stop, is_final))
    return BlockLayout(tuple(blocks), n, settings)
