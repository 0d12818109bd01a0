"""Reference semantics of block attention, in two forms that tests prove equal.

1. Mask form (the oracle): one Hugging Face forward over the whole prompt with an additive float 4D
   mask (token i of a non-final block sees tokens j <= i of its own block; token i of the final block
   sees every real j <= i) and global position ids 0..N-1.
2. Cache form (what the block cache does): every non-final block is encoded alone from position 0,
   its keys are rotated by the block's offset ("position re-encoding"), the KV of all blocks is
   concatenated, and the final block runs against it with global positions.

RoPE is relative, so rotating a key encoded at position p by d gives the key at p + d exactly. Only
rotary types that are a pure rotation of the stored keys qualify (default, llama3); others are refused.
Additive float masks are used on purpose: eager attention with a bool 4D mask is silently wrong in
transformers 5.x.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import BlockLayout
from .rope import (SUPPORTED_ROPE_TYPES, apply_rotation, inv_freq_from_config,  # noqa: F401  (re-exported)
                   rope_cos_sin, rope_inv_freq, rotate_keys)



def block_attention_mask(layout: BlockLayout, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Additive 4D mask ``[1, 1, N, N]``: 0 where attention is allowed, the dtype's min elsewhere.

    Pads attend only to themselves (so their rows stay finite) and nobody attends to a pad.
    """
    n = layout.num_tokens
    bidx = torch.tensor(layout.block_index(), device=device)
    final = len(layout.blocks) - 1
    i = torch.arange(n, device=device)
    causal = i[None, :] <= i[:, None]
    same_block = bidx[:, None] == bidx[None, :]
    real_key = bidx[None, :] >= 0
    from_final = (bidx == final)[:, None]
    allowed = causal & real_key & (same_block | from_final)
    allowed |= torch.eye(n, dtype=torch.bool, device=device) & (bidx < 0)[:, None]
    mask = torch.zeros(n, n, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def full_attention_mask(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Additive 4D causal mask ``[1, 1, n, n]`` (stock attention), in the same form as the block mask."""
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def block_forward(model, input_ids: Sequence[int] | torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Logits ``[N, vocab]`` of the mask form. Rows of pad tokens are meaningless."""
    ids = torch.as_tensor(input_ids, device=model.device).reshape(1, -1)
    if ids.shape[1] != layout.num_tokens:
        raise ValueError(f"layout covers {layout.num_tokens} tokens but input_ids has {ids.shape[1]}")
    mask = block_attention_mask(layout, dtype=model.dtype, device=model.device)
    pos = torch.tensor([layout.positions()], device=model.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0]


@torch.no_grad()
def full_forward(model, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Logits ``[N, vocab]`` under ordinary causal attention."""
    ids = torch.as_tensor(input_ids, device=model.device).reshape(1, -1)
    return model(input_ids=ids).logits[0]


@torch.no_grad()
def encode_block(model, block_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV of one block encoded alone from position 0 (canonical keys), per layer ``[1, kv, len, hd]``."""
    from transformers.cache_utils import DynamicCache

    ids = torch.as_tensor(list(block_ids), device=model.device)[None]
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def block_forward_cached(model, input_ids: Sequence[int] | torch.Tensor, layout: BlockLayout,
                         block_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> torch.Tensor:
    """Logits ``[len(final block), vocab]`` of the cache form.

    ``block_kv`` optionally maps a context block's index to KV computed earlier by :func:`encode_block`
    (e.g. in another prompt, at another offset); missing blocks are encoded here.
    """
    from transformers.cache_utils import DynamicCache

    ids = [int(t) for t in torch.as_tensor(input_ids).reshape(-1).tolist()]
    inv_freq = rope_inv_freq(model)
    offsets = layout.offsets()
    per_layer: list[tuple[list, list]] = [([], []) for _ in range(model.config.num_hidden_layers)]
    for b, blk in enumerate(layout.context_blocks):
        kv = (block_kv or {}).get(b) or encode_block(model, ids[blk.start : blk.end])
        for layer, (k, v) in enumerate(kv):
            per_layer[layer][0].append(rotate_keys(k, offsets[b], inv_freq))
            per_layer[layer][1].append(v)
    final = layout.final
    final_ids = torch.tensor([ids[final.start : final.end]], device=model.device)
    pos = torch.arange(offsets[-1], offsets[-1] + final.num_tokens, device=model.device)[None]
    if not layout.context_blocks:
        return model(input_ids=final_ids, position_ids=pos).logits[0]
    cache = DynamicCache(config=model.config)
    for layer, (ks, vs) in enumerate(per_layer):
        cache.update(torch.cat(ks, dim=-2), torch.cat(vs, dim=-2), layer)
    return model(input_ids=final_ids, position_ids=pos, past_key_values=cache, use_cache=True).logits[0]


@torch.no_grad()
def block_generate(model, input_ids: Sequence[int], layout: BlockLayout, max_new_tokens: int = 16,
                   eos_token_id: int | None = None, return_logprobs: bool = False):
    """Greedy generation under block attention (generated tokens join the final block).

    The prompt is prefilled once with the block mask; every generated token then attends to all real
    prompt tokens and to the tokens generated before it, which is plain cached decoding (pads, if the
    layout has any, stay masked). With ``return_logprobs`` also returns each chosen token's log-prob.
    """
    from transformers.cache_utils import DynamicCache

    dev, dtype = model.device, model.dtype
    ids = torch.as_tensor(list(input_ids), device=dev)[None]
    cache = DynamicCache(config=model.config)
    mask = block_attention_mask(layout, dtype=dtype, device=dev)
    pos = torch.tensor([layout.positions()], device=dev)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
    real = torch.tensor(layout.block_index(), device=dev) >= 0
    next_pos = len(layout.real_token_indices())
    out, lps = [], []
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(logits[0, -1].float(), -1)
        tok = int(logp.argmax())
        out.append(tok)
        lps.append(logp[tok].item())
        if eos_token_id is not None and tok == eos_token_id or len(out) == max_new_tokens:
            break
        real = torch.cat([real, real.new_ones(1)])
        step_mask = torch.zeros(1, 1, 1, real.numel(), dtype=dtype, device=dev)
        step_mask.masked_fill_(~real, torch.finfo(dtype).min)
        logits = model(input_ids=torch.tensor([[tok]], device=dev), attention_mask=step_mask,
                       position_ids=torch.tensor([[next_pos]], device=dev), past_key_values=cache,
                       use_cache=True).logits
        next_pos += 1
    return (out, lps) if return_logprobs else out
