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
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SINK_TOKEN = "<|block_sink|>"
DEFAULT_NUM_SINKS = 4
CONFIG_KEY = "block_attention"


class BlockLayoutError(ValueError):
    """A block prompt (or the request to build one) does not follow the block layout protocol."""


@dataclass(frozen=True)
class BlockSettings:
    """How block boundaries are marked in token ids.

    Args:
        sink_token_id: id of the sink token (``<|block_sink|>`` for a distilled checkpoint; any existing
            token for the training-free baseline).
        num_sinks: sinks per group (k).
    """

    sink_token_id: int
    num_sinks: int = DEFAULT_NUM_SINKS

    def __post_init__(self):
        if not isinstance(self.sink_token_id, int) or self.sink_token_id < 0:
            raise BlockLayoutError(f"sink_token_id must be a non-negative int, got {self.sink_token_id!r}")
        if not isinstance(self.num_sinks, int) or self.num_sinks < 1:
            raise BlockLayoutError(f"num_sinks must be a positive int, got {self.num_sinks!r}")

    def to_dict(self) -> dict:
        return {"sink_token_id": self.sink_token_id, "num_sinks": self.num_sinks}

    @classmethod
    def from_dict(cls, d: dict) -> BlockSettings:
        unknown = set(d) - {"sink_token_id", "num_sinks", "sink_token"}
        if unknown:
            raise BlockLayoutError(f"unknown block_attention settings: {sorted(unknown)}")
        if "sink_token_id" not in d:
            raise BlockLayoutError(f"block_attention settings need 'sink_token_id', got {d!r}")
        return cls(sink_token_id=int(d["sink_token_id"]), num_sinks=int(d.get("num_sinks", DEFAULT_NUM_SINKS)))

    @classmethod
    def from_tokenizer(cls, tokenizer, sink_token: str = SINK_TOKEN, num_sinks: int = DEFAULT_NUM_SINKS) -> BlockSettings:
        """Settings for ``tokenizer``, whose vocabulary must hold ``sink_token`` as a single token."""
        vocab = tokenizer.get_vocab()
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


@dataclass(frozen=True)
class Block:
    """One block of a prompt, as half-open spans into the token ids.

    ``start`` is the first token of the block (its first sink, or token 0 for a prefix block),
    ``content_start`` the first token after its sink group, ``end`` one past its last real token and
    ``padded_end`` one past its pads (``== end`` when unpadded). Pads only follow non-final blocks.
    """

    start: int
    content_start: int
    end: int
    padded_end: int
    is_final: bool

    @property
    def num_tokens(self) -> int:
        """Real tokens (sinks + content), pads excluded."""
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
        """Block index of every token; -1 for pads."""
        out = [-1] * self.num_tokens
        for b, blk in enumerate(self.blocks):
            out[blk.start : blk.end] = [b] * blk.num_tokens
        return out

    def positions(self) -> list[int]:
        """Global logical position of every token (0..N-1 over real tokens).

        A pad repeats the position of the token before it; its value never matters because nothing
        attends to a pad.
        """
        out, pos = [], 0
        for blk in self.blocks:
            out.extend(range(pos, pos + blk.num_tokens))
            pos += blk.num_tokens
            out.extend([max(pos - 1, 0)] * blk.num_pads)
        return out

    def offsets(self) -> list[int]:
        """Logical offset (global position of the first token) of every block."""
        out, pos = [], 0
        for blk in self.blocks:
            out.append(pos)
            pos += blk.num_tokens
        return out

    def real_token_indices(self) -> list[int]:
        """Indices of the non-pad tokens, in order."""
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
    if pad_id is not None and pad_id == settings.sink_token_id:
        raise BlockLayoutError("pad_id must differ from the sink token id")

    def encode(block, what):
        if isinstance(block, str):
            if tokenizer is None:
                raise BlockLayoutError(f"{what} is text; pass a tokenizer to encode it")
            return tokenizer.encode(block, add_special_tokens=False)
        return _check_ids(block, what)

    sinks = [settings.sink_token_id] * settings.num_sinks
    pieces: list[list[int]] = []  # one per block, the prefix block first
    if prefix is not None:
        head = encode(prefix, "prefix")
        if settings.sink_token_id in head:
            raise BlockLayoutError(f"the prefix contains the sink token id {settings.sink_token_id}")
        if head:
            pieces.append(head)
    for i, block in enumerate(blocks):
        what = f"block {i}" + (" (final)" if i == len(blocks) - 1 else "")
        toks = encode(block, what)
        if not toks:
            raise BlockLayoutError(f"{what} is empty")
        if settings.sink_token_id in toks:
            raise BlockLayoutError(
                f"{what} contains the sink token id {settings.sink_token_id} at offset "
                f"{toks.index(settings.sink_token_id)}; sinks are added by the layout, not by the text"
            )
        pieces.append(sinks + toks)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        ids.extend(piece)
        if page_size is not None and i < len(pieces) - 1:
            ids.extend([pad_id] * page_padding(len(piece), page_size))
    return ids


def page_padding(num_tokens: int, page_size: int) -> int:
    """Pad slots after a non-final block of ``num_tokens`` real tokens so that the next block starts on a
    KV page boundary: the one rule for padding (the block cache, the engine's paged layout and padded
    block prompts all use it). Pads are never content: they take no position and no query sees them."""
    return -num_tokens % page_size


def build_block_text(blocks: Sequence[str], sink_token: str = SINK_TOKEN, num_sinks: int = DEFAULT_NUM_SINKS) -> str:
    """The text form of a block prompt, for paths that only carry text (the OpenAI server, chat
    messages). The sink token must be a special token of the tokenizer so that it survives encoding."""
    if not blocks:
        raise BlockLayoutError("empty block list: a block prompt needs at least one (final) block")
    for i, b in enumerate(blocks):
        if not b:
            raise BlockLayoutError(f"block {i} is empty")
        if sink_token in b:
            raise BlockLayoutError(f"block {i} contains the sink token {sink_token!r}")
    return "".join(sink_token * num_sinks + b for b in blocks)


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
        BlockLayoutError: a sink run whose length is not ``num_sinks``, a sink group with no content
            after it, or an empty prompt.
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
    s, k = settings.sink_token_id, settings.num_sinks

    # Sink group starts; every maximal run of sink ids must be exactly k long (vectorized: the parse
    # runs on every prompt in the server's frontend and scheduler).
    edges = np.diff(np.concatenate(([0], (arr == s).astype(np.int8), [0])))
    run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for i, j in zip(run_starts.tolist(), run_ends.tolist()):
        if j - i != k:
            raise BlockLayoutError(
                f"sink run of length {j - i} at token {i}; every sink group must be exactly {k} "
                f"sink tokens (id {s}) followed by the block's content"
            )
        if j == n:
            raise BlockLayoutError(f"sink group at token {i} ends the prompt: the block after it is empty")
    starts = run_starts.tolist()
    if not starts:
        return BlockLayout((Block(0, 0, n, n, True),), n, settings)

    bounds = ([0] if starts[0] > 0 else []) + starts + [n]
    blocks = []
    for b in range(len(bounds) - 1):
        start, stop = bounds[b], bounds[b + 1]
        is_final = b == len(bounds) - 2
        content_start = start + k if arr[start] == s else start
        end = stop
        if not is_final and page_size is not None and (stop - start) % page_size == 0:
            # The builder adds fewer than page_size pads; content should not end with the pad id.
            while stop - end < page_size - 1 and end > content_start + 1 and arr[end - 1] == pad_id:
                end -= 1
        blocks.append(Block(start, content_start, end, stop, is_final))
    return BlockLayout(tuple(blocks), n, settings)
