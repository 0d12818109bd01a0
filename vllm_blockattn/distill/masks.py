"""Training masks built on the reference block layout and masks (no second mask builder).

Everything here starts from a :class:`~vllm_blockattn.core.layout.BlockLayout` (``parse_block_prompt``) and
from :func:`~vllm_blockattn.core.reference.block_attention_mask` / :func:`full_attention_mask`:

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

from ..core.layout import BlockLayout
from ..core.reference import block_attention_mask, full_attention_mask


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


# --- block ids and FlexAttention BlockMasks (the memory-lean path) ------------------------------------
#
# A pattern row is described by two [L] vectors instead of an [L, L] mask:
#   ``doc[t]``  the block id of token t (any id per block; pads get unique negative ids),
#   ``glob[t]`` True when token t's row is a full causal row (sees every earlier real token).
# Token q may attend to key k iff ``k <= q and (doc[q] == doc[k] or (glob[q] and doc[k] >= 0))``.
# That is the reference rule: block rows see their own block, global rows see everything before them,
# pads see themselves only and nobody sees a pad. The tests check the rule against the reference masks.

def _pad_ids(L: int, n: int, device=None) -> torch.Tensor:
    return -1 - torch.arange(n, L, device=device)  # unique negative ids: a pad sees only itself


def block_pattern_ids(layout: BlockLayout, length: int, dropped: Sequence[int] | None = None,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(doc [length] long, glob [length] bool)`` of one sample's block pattern (``dropped=None``: every
    context block alone, the final block global) or dropout pattern (``dropped``: those context blocks
    alone, every other row global), right-padded to ``length``."""
    _check_unpadded(layout)
    n = layout.num_tokens
    if n > length:
        raise ValueError(f"layout covers {n} tokens, more than length {length}")
    bidx = torch.tensor(layout.block_index(), dtype=torch.long, device=device)
    final = len(layout.blocks) - 1
    if dropped is None:
        glob = bidx == final
    else:
        glob = torch.ones(n, dtype=torch.bool, device=device)
        for b in dropped:
            if not 0 <= b < final:
                raise ValueError(f"dropped block index {b} is not a context block (0..{final - 1})")
            glob[layout.blocks[b].start : layout.blocks[b].end] = False
    doc = torch.cat([bidx, _pad_ids(length, n, device)])
    return doc, torch.cat([glob, torch.zeros(length - n, dtype=torch.bool, device=device)])


def full_pattern_ids(n: int, length: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(doc, glob)`` of a plain causal sequence of ``n`` real tokens right-padded to ``length``."""
    if n > length:
        raise ValueError(f"{n} tokens, more than length {length}")
    doc = torch.cat([torch.zeros(n, dtype=torch.long, device=device), _pad_ids(length, n, device)])
    glob = torch.cat([torch.ones(n, dtype=torch.bool, device=device),
                      torch.zeros(length - n, dtype=torch.bool, device=device)])
    return doc, glob


def dense_mask_from_ids(doc: torch.Tensor, glob: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``[B, 1, L, L]`` mask of ``(doc, glob)`` rows ``[B, L]``: the dense form of
    :func:`flex_block_mask` (equal to the reference-built masks; tested)."""
    L = doc.shape[1]
    i = torch.arange(L, device=doc.device)
    allowed = (i[None, None, :] <= i[None, :, None]) & (
        (doc[:, :, None] == doc[:, None, :]) | (glob[:, :, None] & (doc[:, None, :] >= 0)))
    out = torch.zeros(allowed.shape, dtype=dtype, device=doc.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def flex_block_mask(doc: torch.Tensor, glob: torch.Tensor, block_size: int = 128):
    """A FlexAttention ``BlockMask`` for rows ``(doc, glob)`` ``[B, L]``, built without any ``[L, L]`` tensor.

    The tile structure (which ``block_size`` x ``block_size`` tiles are empty, partial or full) is computed one
    query tile at a time (``B x block_size x L`` booleans at most), then handed to ``BlockMask.from_kv_blocks``
    together with the ``mask_mod`` that FlexAttention applies inside the partial tiles.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if doc.shape != glob.shape or doc.dim() != 2:
        raise ValueError(f"doc {tuple(doc.shape)} and glob {tuple(glob.shape)} must be the same [B, L]")
    B, L = doc.shape
    device = doc.device
    nb = -(-L // block_size)
    Lp = nb * block_size
    # Keys past L never attend: a sentinel id that no query has and that is negative (not a real key).
    dk = torch.cat([doc, torch.full((B, Lp - L), torch.iinfo(torch.long).min, dtype=doc.dtype, device=device)], 1)
    kpos = torch.arange(Lp, device=device)
    partial = torch.zeros(B, nb, nb, dtype=torch.bool, device=device)
    full = torch.zeros(B, nb, nb, dtype=torch.bool, device=device)
    for qi in range(nb):
        q = torch.arange(qi * block_size, min((qi + 1) * block_size, L), device=device)
        m = (kpos[None, None, :] <= q[None, :, None]) & (
            (doc[:, q, None] == dk[:, None, :]) | (glob[:, q, None] & (dk[:, None, :] >= 0)))
        m = m.view(B, q.numel(), nb, block_size)
        some, every = m.any(dim=(1, 3)), m.all(dim=(1, 3))
        full[:, qi] = every if q.numel() == block_size else False
        partial[:, qi] = some & ~full[:, qi]

    def indices(sel):
        num = sel.sum(-1, dtype=torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[:, None], order[:, None]

    def mask_mod(b, h, q_idx, kv_idx):
        dq, dkv = doc[b, q_idx], doc[b, kv_idx]
        return (kv_idx <= q_idx) & ((dq == dkv) | (glob[b, q_idx] & (dkv >= 0)))

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(L, L))
