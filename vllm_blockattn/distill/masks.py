"""Training masks built on the reference block layout and masks (no second mask builder).

Everything here starts from a :class:`~vllm_blockattn.layout.BlockLayout` (``parse_block_prompt``) and
from :func:`~vllm_blockattn.reference.block_attention_mask` / :func:`full_attention_mask`:

- the *block* pattern is the reference block mask itself (every context block alone, final block global);
- the *dropout* pattern takes the block-mask rows of the dropped context blocks and the full causal rows
  of everything else (non-dropped context blocks and the final block attend to every earlier token);
- the *full* pattern (teacher) runs on the sink-free sequence, with a plain causal mask.

Masks are additive float (0 = attend, dtype min = blocked): bool 4D masks are silently wrong under eager
attention in transformers 5.x.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layout import BlockLayout
from ..reference import block_attention_mask, full_attention_mask


def _check_unpadded(layout: BlockLayout) -> None:
    if any(b.num_pads for b in layout.blocks):
        raise ValueError("training layouts must be unpadded (page padding is the serving plugin's business)")


def sample_dropped_blocks(layout: BlockLayout, rate: float,
                          generator: torch.Generator | None = None) -> tuple[int, ...]:
    """Block dropout: each context block is independently selected with probability ``rate``.

    Returns the selected context-block indices (into ``layout.blocks``), in order. The final block is never
    selected. Selecting a leading block changes nothing (it sees only itself under either pattern).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    n = len(layout.context_blocks)
    draws = torch.rand(n, generator=generator).tolist()
    return tuple(i for i, d in enumerate(draws) if d < rate)


def dropout_attention_mask(layout: BlockLayout, dropped: Sequence[int], dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """Additive mask ``[1, 1, N, N]``: block-mask rows for the tokens of ``dropped`` context blocks, full
    causal rows for all other tokens. ``dropped=()`` gives the full causal mask; all context blocks give
    the reference block mask."""
    _check_unpadded(layout)
    final = len(layout.blocks) - 1
    rows = torch.zeros(layout.num_tokens, dtype=torch.bool, device=device)
    for b in dropped:
        if not 0 <= b < final:
            raise ValueError(f"dropped block index {b} is not a context block (0..{final - 1})")
        blk = layout.blocks[b]
        rows[blk.start : blk.end] = True
    block = block_attention_mask(layout, dtype=dtype, device=device)
    full = full_attention_mask(layout.num_tokens, dtype=dtype, device=device)
    return torch.where(rows[:, None], block, full)


def content_index(layout: BlockLayout) -> torch.Tensor:
    """``[N]`` long: each non-sink token's index in the sink-free sequence, -1 for sinks.

    The teacher's full-attention forward runs on the sink-free sequence (what the full-attention model
    really sees); this maps student positions onto teacher positions.
    """
    _check_unpadded(layout)
    out = torch.full((layout.num_tokens,), -1, dtype=torch.long)
    j = 0
    for blk in layout.blocks:
        n = blk.end - blk.content_start
        out[blk.content_start : blk.end] = torch.arange(j, j + n)
        j += n
    return out


def kl_query_mask(layout: BlockLayout, dropped: Sequence[int]) -> torch.Tensor:
    """``[N]`` bool: query positions whose next-token distribution enters the KL term.

    A position counts when it is a content token (not a sink) of a block that was not dropped (or of the
    final block) and the token it predicts is the next content token of the same block. The last token of a
    context block is left out: the student's next token there is a sink, the teacher's is the next
    block's content, so their distributions are not comparable.
    """
    _check_unpadded(layout)
    dropped = set(dropped)
    out = torch.zeros(layout.num_tokens, dtype=torch.bool)
    for b, blk in enumerate(layout.blocks):
        if b in dropped:
            continue
        out[blk.content_start : blk.end - 1] = True
    return out


def pad_attention_masks(masks: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack per-sample additive masks ``[1, 1, n_i, n_i]`` into ``[B, 1, length, length]``.

    Pad rows attend only to themselves (their rows stay finite) and nobody attends to a pad.
    """
    if not masks:
        raise ValueError("no masks to stack")
    dtype, device = masks[0].dtype, masks[0].device
    out = torch.full((len(masks), 1, length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    diag = torch.arange(length, device=device)
    for i, m in enumerate(masks):
        n = m.shape[-1]
        if n > length:
            raise ValueError(f"mask {i} covers {n} tokens, more than length {length}")
        out[i, 0, :n, :n] = m[0, 0]
        out[i, 0, diag[n:], diag[n:]] = 0
    return out


def batch_dropout_attention_masks(block_masks: torch.Tensor, layouts: Sequence[BlockLayout],
                                  dropped: Sequence[Sequence[int]]) -> torch.Tensor:
    """The batch's dropout masks from its already padded block masks, without rebuilding any mask.

    Equals ``pad_attention_masks([dropout_attention_mask(lay, d) ...], L)`` (tested): rows of dropped
    blocks and pad rows come from ``block_masks`` ``[B, 1, L, L]`` (:func:`pad_attention_masks` of the
    reference block masks); all other rows are full causal rows.
    """
    B, _, L, _ = block_masks.shape
    if len(layouts) != B or len(dropped) != B:
        raise ValueError(f"{B} block masks but {len(layouts)} layouts and {len(dropped)} dropout draws")
    rows = torch.ones(B, L, dtype=torch.bool)
    for i, (lay, d) in enumerate(zip(layouts, dropped)):
        _check_unpadded(lay)
        final = len(lay.blocks) - 1
        rows[i, : lay.num_tokens] = False
        for b in d:
            if not 0 <= b < final:
                raise ValueError(f"dropped block index {b} is not a context block (0..{final - 1})")
            rows[i, lay.blocks[b].start : lay.blocks[b].end] = True
    causal = full_attention_mask(L, dtype=block_masks.dtype, device=block_masks.device)
    return torch.where(rows.to(block_masks.device)[:, None, :, None], block_masks, causal)
