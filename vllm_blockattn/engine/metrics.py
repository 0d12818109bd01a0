"""Block cache metrics.

Prometheus counters live in the process that runs the scheduler (the engine core). The server sees
them when ``PROMETHEUS_MULTIPROC_DIR`` is set before vLLM starts, which is vLLM's own multi-process
metrics mode: ``vllm-blockattn serve`` sets it (see :mod:`vllm_blockattn.cli`). Offline, the same
numbers are on the scheduler (:func:`block_cache_stats`), and per request ``RequestOutput.num_cached_tokens``
(``usage.prompt_tokens_details.cached_tokens`` on the server) counts the prompt tokens whose KV came
from the block cache or the prefix cache, in real tokens of the user's prompt (pads not counted).
"""

from __future__ import annotations

_COUNTERS = None

NAMES = {
    "requests": ("vllm_blockattn:block_requests", "Block-attention requests admitted"),
    "blocks": ("vllm_blockattn:context_blocks", "Non-final blocks in admitted block requests"),
    "block_hits": ("vllm_blockattn:block_cache_hits", "Non-final blocks found in the block cache"),
    "reused_tokens": ("vllm_blockattn:reused_block_tokens", "Tokens of non-final blocks reused from the cache"),
    "pinned_block_hits": ("vllm_blockattn:pinned_block_hits", "Block-cache hits on pinned documents"),
}
_PINNED = None


def set_pinned_pages(n: int) -> None:
    """The ``vllm_blockattn:pinned_pages`` gauge (summed over live engine processes)."""
    global _PINNED
    if _PINNED is None:
        from prometheus_client import Gauge

        _PINNED = Gauge("vllm_blockattn:pinned_pages", "KV pages held by pinned documents",
                        multiprocess_mode="livesum")
    _PINNED.set(n)


def _counters():
    global _COUNTERS
    if _COUNTERS is None:
        from prometheus_client import Counter

        _COUNTERS = {k: Counter(name, doc) for k, (name, doc) in NAMES.items()}
    return _COUNTERS


def record(stats: dict, **increments: int) -> None:
    """Add ``increments`` to the scheduler's ``stats`` dict and to the Prometheus counters."""
    counters = _counters()
    for key, n in increments.items():
        stats[key] += n
        if n:
            counters[key].inc(n)


def block_cache_stats(llm) -> dict:
    """Block cache counters of an offline ``LLM`` running its engine in-process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): requests, blocks, block_hits, reused_tokens,
    pinned_block_hits, pinned_pages."""
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    except AttributeError:
        raise RuntimeError("block_cache_stats needs the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0); "
                           "otherwise read RequestOutput.num_cached_tokens or the server's /metrics") from None
    pins = getattr(scheduler, "_blockattn_pins", None)
    return {**scheduler.blockattn_stats, "pinned_pages": pins.pinned_pages if pins is not None else 0}
