"""Triton kernels for paged block attention (installed as ``blockattn_kernels``).

The source folder is ``triton_kernels/`` but the import name is ``blockattn_kernels``: vLLM imports an
unrelated top-level ``triton_kernels`` package (MoE) that this one must never shadow.

Public API (all three take the vLLM CUDA cache layout, ``[pages, page_size, kv_heads, head_dim]``):

- :func:`block_attention_prefill`: Triton, any number of query tokens per sequence;
- :func:`block_attention_decode`: Triton, one final-block query per sequence, split-K;
- :func:`block_attention_decode_rows`: the same split-K kernel on the single-query rows of a mixed batch
  (prefill's arguments plus a row list; the prefill kernel takes the other rows with ``rows=``);
- :func:`block_attention_torch`: pure torch, same arguments and results as the prefill kernel.

Semantics in ``docs/kernels.md``; the kernel benchmark and the GPU check are ``python -m tools.kernel_bench`` and
``python -m tools.gpu_check`` (test kits in the repository, not installed).
"""

from ._common import enable_triton_interpreter, triton_interpreted
from .decode import block_attention_decode, block_attention_decode_rows
from .prefill import block_attention_prefill
from .torch_ref import block_attention_torch

__all__ = [
    "block_attention_prefill",
    "block_attention_decode",
    "block_attention_decode_rows",
    "block_attention_torch",
    "enable_triton_interpreter",
    "triton_interpreted",
]
