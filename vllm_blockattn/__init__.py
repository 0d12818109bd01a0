"""vllm-blockattn: block attention served by vLLM.

The ``vllm.general_plugins`` entry point calls :func:`register` in every vLLM process.
"""

from .core.layout import (
    CONFIG_KEY,
    DEFAULT_NUM_SINKS,
    SINK_TOKEN,
    Block,
    BlockLayout,
    BlockLayoutError,
    BlockSettings,
    build_block_prompt,
    build_block_text,
    parse_block_prompt,
)

from ._compat import hide_source_triton_kernels

__version__ = "0.1.0"

# Run from the repository root, the kernels' source folder would import as an empty `triton_kernels`
# namespace package and pass for vLLM's MoE kernels package; hide it as early as we can.
hide_source_triton_kernels()

__all__ = [
    "CONFIG_KEY", "DEFAULT_NUM_SINKS", "SINK_TOKEN", "Block", "BlockLayout", "BlockLayoutError", "BlockSettings",
    "block_cache_stats", "build_block_prompt", "preload_documents", "build_block_text", "parse_block_prompt", "register",
]


def preload_documents(llm, documents, **kwargs) -> dict:
    """Load ``documents`` into an offline ``LLM``'s block cache (see
    :func:`vllm_blockattn.preload.preload_documents`)."""
    from .preload import preload_documents as run

    return run(llm, documents, **kwargs)


def block_cache_stats(llm) -> dict:
    """Block-cache counters of an offline ``LLM`` with the in-process engine (see
    :func:`vllm_blockattn.engine.metrics.block_cache_stats`)."""
    from .engine.metrics import block_cache_stats as stats

    return stats(llm)

_registered = False


def register() -> None:
    """vLLM plugin hook: safe to call twice; heavy imports stay inside."""
    global _registered
    if _registered:
        return
    _registered = True
    from .plugin import apply_patches

    hide_source_triton_kernels()
    apply_patches()
