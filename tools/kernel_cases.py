"""Synthetic paged block-attention inputs, for the tests and the GPU check (``bench.py``).

A :class:`SeqSpec` lists a sequence's non-final block lengths, its final block's length and how many of
its last slots are this step's queries. :func:`make_case` lays the blocks out page-aligned (pads
after each non-final block up to a page boundary), scatters them over randomly permuted pages of a
paged cache, and fills every kernel argument. It also keeps the unpaged per-sequence K/V and each
slot's block id, so a test can build a dense oracle without reading the paged metadata.
Pad slots and unused cache slots hold NaN: a kernel that reads them fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SeqSpec:
    """One sequence: ``blocks`` = real lengths of the non-final blocks, ``final`` = final block length,
    ``q_len`` = how many trailing slots are queries (``None``: every slot, i.e. a whole prefill)."""

    blocks: tuple[int, ...]
    final: int
    q_len: int | None = None

    def __post_init__(self):
        if any(b < 1 for b in self.blocks):
            raise ValueError(f"blocks must all be >= 1 tokens, got {self.blocks}")
        if self.final < 1:
            raise ValueError(f"final must be >= 1 tokens, got {self.final}")
        if self.q_len is not None and self.q_len < 1:
            raise ValueError(f"q_len must be >= 1 or None, got {self.q_len}")


@dataclass
class SeqTruth:
    """Unpaged ground truth of one sequence (``L`` = seq_len slots)."""

    keys: torch.Tensor          # [L, Hkv, D] as stored (canonical for non-final blocks)
    values: torch.Tensor        # [L, Hkv, D]
    block_id: torch.Tensor      # [L] int64: block of each slot; the final block has id len(blocks)
    is_pad: torch.Tensor        # [L] bool
    block_offset: list[int]     # logical offset of each non-final block (its keys' RoPE delta)
    q_len: int


@dataclass
class BlockCase:
    """Every argument of the kernels, plus the ground truth per sequence."""

    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    q_kv_start: torch.Tensor
    q_is_final: torch.Tensor
    page_delta: torch.Tensor
    page_valid: torch.Tensor
    inv_freq: torch.Tensor
    scale: float
    truth: list[SeqTruth] = field(default_factory=list)

    def prefill_args(self) -> tuple:
        """Positional arguments of ``block_attention_prefill`` / ``block_attention_torch``."""
        return (self.q, self.key_cache, self.value_cache, self.block_table, self.query_start_loc, self.seq_lens,
                self.q_kv_start, self.q_is_final, self.page_delta, self.page_valid, self.inv_freq, self.scale)

    def decode_args(self) -> tuple:
        """Positional arguments of ``block_attention_decode`` (needs exactly one query per sequence)."""
        if self.q.shape[0] != self.block_table.shape[0]:
            raise ValueError("decode needs exactly one query per sequence (SeqSpec.q_len = 1)")
        return (self.q, self.key_cache, self.value_cache, self.block_table, self.seq_lens, self.page_delta,
                self.page_valid, self.inv_freq, self.scale)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Default RoPE inverse frequencies ``[head_dim // 2]``."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def make_case(specs: list[SeqSpec], *, page_size: int, q_heads: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
              spare_pages: int = 3, nan_fill: bool = True) -> BlockCase:
    """Build a batch of sequences laid out page-aligned in a shuffled paged cache."""
    gen = torch.Generator().manual_seed(seed)
    layouts = []
    for spec in specs:
        block_id, is_pad, offsets, logical = [], [], [], 0
        for b, n in enumerate(spec.blocks):
            padded = -(-n // page_size) * page_size
            block_id += [b] * padded
            is_pad += [False] * n + [True] * (padded - n)
            offsets.append(logical)
            logical += n
        block_id += [len(spec.blocks)] * spec.final
        is_pad += [False] * spec.final
        seq_len = len(block_id)
        q_len = seq_len if spec.q_len is None else spec.q_len
        if q_len > seq_len:
            raise ValueError(f"q_len {q_len} exceeds the sequence's {seq_len} slots")
        layouts.append((torch.tensor(block_id), torch.tensor(is_pad), offsets, q_len))

    pages_per_seq = [-(-len(bid) // page_size) for bid, *_ in layouts]
    max_pages = max(pages_per_seq)
    num_pages = sum(pages_per_seq) + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    fill = float("nan") if nan_fill else 0.0
    key_cache = torch.full((num_pages, page_size, kv_heads, head_dim), fill, dtype=torch.float32)
    value_cache = torch.full_like(key_cache, fill)
    block_table = torch.zeros(len(specs), max_pages, dtype=torch.int32)
    page_delta = torch.zeros(len(specs), max_pages, dtype=torch.int32)
    page_valid = torch.zeros(len(specs), max_pages, dtype=torch.int32)
    qs, kv_start, is_final, qsl, truth = [], [], [], [0], []
    used = 0
    for s, (block_id, is_pad, offsets, q_len) in enumerate(layouts):
        seq_len = len(block_id)
        n_pages = pages_per_seq[s]
        final_id = len(offsets)
        keys = torch.randn(seq_len, kv_heads, head_dim, generator=gen)
        values = torch.randn(seq_len, kv_heads, head_dim, generator=gen)
        keys[is_pad] = fill
        values[is_pad] = fill
        pages = perm[used:used + n_pages]
        used += n_pages
        block_table[s, :n_pages] = pages.to(torch.int32)
        padded_k = torch.full((n_pages * page_size, kv_heads, head_dim), fill)
        padded_v = padded_k.clone()
        padded_k[:seq_len], padded_v[:seq_len] = keys, values
        key_cache[pages] = padded_k.view(n_pages, page_size, kv_heads, head_dim)
        value_cache[pages] = padded_v.view(n_pages, page_size, kv_heads, head_dim)
        for p in range(n_pages):
            ids = block_id[p * page_size:(p + 1) * page_size]
            b = int(ids[0])
            page_delta[s, p] = offsets[b] if b != final_id else 0
            page_valid[s, p] = int((~is_pad[p * page_size:(p + 1) * page_size]).sum())
        first_slot = torch.tensor([int((block_id == b).nonzero()[0]) for b in range(final_id + 1)])
        q_block = block_id[seq_len - q_len:]
        kv_start.append(torch.where(q_block == final_id, 0, first_slot[q_block]))
        is_final.append(q_block == final_id)
        qs.append(torch.randn(q_len, q_heads, head_dim, generator=gen))
        qsl.append(qsl[-1] + q_len)
        truth.append(SeqTruth(keys.to(dtype).to(device), values.to(dtype).to(device), block_id.to(device),
                              is_pad.to(device), offsets, q_len))

    def dev(t):
        return t.to(device)

    return BlockCase(
        q=dev(torch.cat(qs).to(dtype)), key_cache=dev(key_cache.to(dtype)), value_cache=dev(value_cache.to(dtype)),
        block_table=dev(block_table), query_start_loc=dev(torch.tensor(qsl, dtype=torch.int32)),
        seq_lens=dev(torch.tensor([len(b) for b, *_ in layouts], dtype=torch.int32)),
        q_kv_start=dev(torch.cat(kv_start).to(torch.int32)), q_is_final=dev(torch.cat(is_final)),
        page_delta=dev(page_delta), page_valid=dev(page_valid), inv_freq=dev(rope_inv_freq(head_dim)),
        scale=head_dim ** -0.5, truth=truth)
