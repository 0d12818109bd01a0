"""Pure-torch paged block attention: the CPU path and the reference the Triton kernels are tested against.

Same arguments and results as :func:`blockattn_kernels.block_attention_prefill`. A readable loop per
sequence, then per *run* of its queries that share one ``(q_kv_start, q_is_final)`` (the queries of
one non-final block, or of the final block), all in float32:

1. gather the sequence's K/V slots through its block table, zero the pad slots;
2. for a final run, rotate every key by its page's delta (rotate_half formula);
3. one SDPA call over the run's key window ``[q_kv_start, last own slot]`` with a boolean mask
   (``j <= own slot`` and ``j`` real). SDPA keeps memory at ``O(run * window)`` for the mask only.
A query row that may see no slot at all gets zeros (the Triton kernels do the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_common, check_out, check_prefill_extra

RUN_CHUNK = 1024   # queries per SDPA call: bounds the boolean mask at RUN_CHUNK * seq_len


def rotate_half_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd vectors ``[n, ..., D]`` by ``delta[n]`` positions (rotate_half layout), in float32."""
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]        # [n, D/2]
    emb = torch.cat((ang, ang), dim=-1).reshape(ang.shape[0], *([1] * (x.dim() - 2)), -1)
    half = x.shape[-1] // 2
    x = x.to(torch.float32)
    return x * emb.cos() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * emb.sin()


def _runs(kv_start: torch.Tensor, is_final: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of equal ``(kv_start, is_final)``, cut at ``RUN_CHUNK`` rows."""
    n = kv_start.shape[0]
    change = (kv_start[1:] != kv_start[:-1]) | (is_final[1:] != is_final[:-1])
    cuts = [0, *(change.nonzero().flatten() + 1).tolist(), n]
    return [(a, min(a + RUN_CHUNK, b)) for lo, b in zip(cuts[:-1], cuts[1:]) for a in range(lo, b, RUN_CHUNK)]


def block_attention_torch(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                          q_kv_start: torch.Tensor, q_is_final: torch.Tensor, page_delta: torch.Tensor,
                          page_valid: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Paged block attention in torch; arguments and result exactly as ``block_attention_prefill``."""
    hq, hkv, d, page_size, s = check_common(q, key_cache, value_cache, block_table, seq_lens, page_delta,
                                            page_valid, inv_freq, scale)
    check_prefill_extra(q, query_start_loc, q_kv_start, q_is_final, s)
    out = check_out(out, q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for seq in range(s):
        q_first, q_end, seq_len = qsl[seq], qsl[seq + 1], lens[seq]
        q_len = q_end - q_first
        if q_len == 0:
            continue
        if not 0 < q_len <= seq_len:
            raise ValueError(f"sequence {seq}: {q_len} queries but seq_lens[{seq}] = {seq_len} slots")
        n_pages = -(-seq_len // page_size)
        if n_pages > block_table.shape[1]:
            raise ValueError(f"sequence {seq}: seq_lens[{seq}] = {seq_len} needs {n_pages} pages, "
                             f"block_table has {block_table.shape[1]}")
        pages = block_table[seq, :n_pages].long()
        slot = torch.arange(seq_len, device=q.device)
        real = (slot % page_size) < page_valid[seq, slot // page_size]
        keys = key_cache[pages].reshape(n_pages * page_size, hkv, d)[:seq_len].float()
        values = value_cache[pages].reshape(n_pages * page_size, hkv, d)[:seq_len].float()
        keys = keys.masked_fill(~real[:, None, None], 0.0)        # pads may hold anything, even NaN
        values = values.masked_fill(~real[:, None, None], 0.0)
        kv_start = q_kv_start[q_first:q_end]
        final = q_is_final[q_first:q_end].bool()
        rotated = rotate_half_by(keys, page_delta[seq, slot // page_size], inv_freq) if final.any() else None

        for a, b in _runs(kv_start, final):
            own = torch.arange(seq_len - q_len + a, seq_len - q_len + b, device=q.device)
            k0 = min(max(int(kv_start[a]), 0), int(own[-1]) + 1)
            win = slice(k0, int(own[-1]) + 1)
            k = (rotated if final[a] else keys)[win]
            allowed = (slot[win][None, :] <= own[:, None]) & real[win][None, :]                  # [n, w]
            ctx = F.scaled_dot_product_attention(
                q[q_first + a:q_first + b].float().transpose(0, 1),                               # [Hq, n, D]
                k.transpose(0, 1), values[win].transpose(0, 1), attn_mask=allowed, scale=scale,
                enable_gqa=hkv != hq)
            ctx = torch.where(allowed.any(dim=1)[None, :, None], ctx, 0.0)                       # empty rows -> 0
            out[q_first + a:q_first + b] = ctx.transpose(0, 1).to(out.dtype)
    return out
