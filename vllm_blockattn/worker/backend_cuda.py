"""The ``blockattn`` attention backend on CUDA: vLLM's Triton backend, with block rows on our kernels.

Batches without a block request run vLLM's own Triton attention unchanged. A batch with one runs
``blockattn_kernels``: ordinary rows are a single final block there (plain causal attention), block
rows get block-diagonal prefill, a global final block and the per-block RoPE delta applied to keys as
they load. Rows are split by their query count: every single-query row (a decode step, block or
ordinary) takes the split-K decode kernel, the other rows the prefill kernel, in the same step.

Per-request metadata is written once per layout into persistent buffers
(:class:`~.kernel_meta.PersistentKernelMetadata`); per step the host splits the rows by query count and the
device computes each token's block start and final flag (no host sync).

CUDA graphs: by default the backend declares ``AttentionCGSupport.NEVER`` (vLLM captures the model
piecewise; attention runs eagerly). With ``VLLM_BLOCKATTN_CUDA_GRAPHS=decode`` in the worker's
environment it declares ``UNIFORM_SINGLE_TOKEN_DECODE``: vLLM then captures full graphs of decode-only
batches, and every decode-only batch (with or without a block request, since the graph captured at
start-up, outside any step, must be the one replayed for both) runs the split-K decode kernel on the
persistent buffers, whose addresses never change between steps. Opt-in because no GPU has run it yet
(``tools.gpu_check`` does, in its engine stage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from .kernel_meta import BlockKernelMetadata, PersistentKernelMetadata
from ..core.rope import inv_freq_from_config
from .hooks import batch_layouts


# "decode": full CUDA graphs of decode-only batches (see the module docstring); anything else: none
CUDA_GRAPHS_ENV = "VLLM_BLOCKATTN_CUDA_GRAPHS"


def full_decode_graphs() -> bool:
    return os.environ.get(CUDA_GRAPHS_ENV, "").strip().lower() == "decode"


@dataclass
class BlockAttnTritonMetadata(TritonAttentionMetadata):
    block: BlockKernelMetadata | None = None


class BlockAttnTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    # our block metadata is rebuilt in build() only (speculative decoding is refused at start-up anyway)
    supports_draft_decode_metadata_update = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if full_decode_graphs() else cls._cudagraph_support

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.supports_draft_decode_metadata_update = False   # the parent sets it per instance
        self.decode_graphs = full_decode_graphs()
        self.page_size = kv_cache_spec.block_size
        self.inv_freq = inv_freq_from_config(vllm_config.model_config.hf_text_config, kv_cache_spec.head_size)
        sched = vllm_config.scheduler_config
        # sized for every batch vLLM may build, padded graph batches included: the buffers must never be
        # reallocated once a graph has captured their addresses
        capture = max(vllm_config.compilation_config.cudagraph_capture_sizes or [0])
        self.block_meta = PersistentKernelMetadata(self.page_size, self.inv_freq, device,
                                                   max_rows=max(sched.max_num_seqs, capture),
                                                   max_tokens=max(sched.max_num_batched_tokens, capture))

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        layouts = batch_layouts(self.vllm_config, cm.num_reqs)
        # with decode graphs, a decode-only batch takes our kernel even without a block request: the
        # graph replayed for it was captured outside any step, i.e. from a batch of ordinary rows
        if not any(layouts) and not (self.decode_graphs and cm.max_query_len <= 1):
            return meta
        block = self.block_meta.update(layouts, cm.query_start_loc_cpu, cm.query_start_loc, cm.seq_lens, cm.num_reqs,
                                       cm.num_actual_tokens, cm.block_table_tensor.shape[1])
        values = {f.name: getattr(meta, f.name) for f in fields(TritonAttentionMetadata)}
        return BlockAttnTritonMetadata(**values, block=block)


class BlockAttnTritonImpl(TritonAttentionImpl):
    def fused_output_quant_supported(self, quant_key) -> bool:
        # The block kernels write unquantized output. Saying yes (the Triton parent does for static fp8)
        # lets vLLM's attn+quant fusion pass (compilation pass_config.fuse_attn_quant, opt-in in 0.32)
        # fuse the quant op away and hand forward an output_scale, which the block path can only refuse.
        return False

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query: [T, Hq, D]; kv_cache: [pages, Hkv, page_size, 2 * D]; output: [T, Hq * D] or [T, Hq, D]."""
        block = getattr(attn_metadata, "block", None)
        if block is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        from blockattn_kernels import block_attention_decode_rows, block_attention_prefill

        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the blockattn backend")
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        out = output[:n].view(n, self.num_heads, self.head_size)
        args = (query[:n], key_cache, value_cache, attn_metadata.block_table, attn_metadata.query_start_loc,
                attn_metadata.seq_lens, block.q_kv_start, block.q_is_final, block.page_delta, block.page_valid,
                block.inv_freq, self.scale)
        if block.num_prefill:
            block_attention_prefill(*args, out=out, rows=block.prefill_rows, rows_query_start=block.prefill_query_start,
                                    rows_tokens=block.prefill_tokens)
        if block.num_decode:
            block_attention_decode_rows(*args, rows=block.decode_rows, out=out)
        return output


class BlockAttnTritonBackend(TritonAttentionBackend):
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls():
        return BlockAttnTritonImpl

    @staticmethod
    def get_builder_cls():
        return BlockAttnTritonMetadataBuilder
