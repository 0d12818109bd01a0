"""Pure-torch paged block attention: the CPU path and the reference the Triton kernels are tested against.

Same arguments and results as :func:`blockattn_kernels.block_attention_prefill`. A readable loop per
sequence (and per chunk of its queries, so memory stays ``O(chunk * seq_len)``), all in float32:

1. gather the sequence's K/V slots through its block table;
2. rotate every key by its page's delta (for final-block queries) with the rotate_half formula;
3. score, mask (``q_kv_start <= j <= own slot``, real slots only), softmax, weight the values.
A query row that may see no slot at all gets zeros (the Triton kernels do the same).
"""

from __future__ import annotations

import torch

from ._common import check_common, check_out, check_prefill_extra

QUERY_CHUNK = 256
SCORE_BUDGET = 1 << 24  # float32 scores per chunk (64 MiB)


def rotate_half_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd vectors ``[n, ..., D]`` by ``delta[n]`` positions (rotate_half layout), in float32."""
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]        # [n, D/2]
    emb = torch.cat((ang, ang), dim=-1).reshape(ang.shape[0], *([1] * (x.dim() - 2)), -1)
    half = x.shape[-1] // 2
    x = x.to(torch.float32)
    return x * emb.cos() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * emb.sin()


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
    group = hq // hkv
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
        keys = key_cache[pages].reshape(n_pages * page_size, hkv, d)[:seq_len].float()
        values = value_cache[pages].reshape(n_pages * page_size, hkv, d)[:seq_len].float()
        slot = torch.arange(seq_len, device=q.device)
        delta = page_delta[seq, slot // page_size]
        real = (slot % page_size) < page_valid[seq, slot // page_size]
        keys = keys.masked_fill(~real[:, None, None], 0.0)        # pads may hold anything, even NaN
        values = values.masked_fill(~real[:, None, None], 0.0)
        any_final = bool(q_is_final[q_first:q_end].any())
        rotated = rotate_half_by(keys, delta, inv_freq) if any_final else None           # [L, Hkv, D]

        chunk = max(16, min(QUERY_CHUNK, SCORE_BUDGET // (hq * seq_len)))
        for c0 in range(0, q_len, chunk):
            c1 = min(c0 + chunk, q_len)
            tok = slice(q_first + c0, q_first + c1)
            own = torch.arange(seq_len - q_len + c0, seq_len - q_len + c1, device=q.device)
            lo = q_kv_start[tok].long()
            final = q_is_final[tok].bool()
            # only the key window some row of the chunk may see
            k1 = int(own.max()) + 1
            k0 = min(max(int(lo.min()), 0), k1)
            win = slice(k0, k1)
            qc = q[tok].float().reshape(c1 - c0, hkv, group, d)                            # [n, Hkv, G, D]
            scores = torch.einsum("nkgd,lkd->kgnl", qc, keys[win])                       # [Hkv, G, n, l]
            if final.any():
                scores_rot = torch.einsum("nkgd,lkd->kgnl", qc, rotated[win])
                scores = torch.where(final[:, None], scores_rot, scores)
            j = slot[win]
            allowed = (j[None, :] >= lo[:, None]) & (j[None, :] <= own[:, None]) & real[win][None, :]
            scores = (scores * scale).masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                         # empty rows -> 0
            ctx = torch.einsum("kgnl,lkd->nkgd", probs, values[win])
            out[tok] = ctx.reshape(c1 - c0, hq, d).to(out.dtype)
    return out
