"""Guards against the environment, each saying why it exists."""

from __future__ import annotations

import importlib.util
import os
import sys

_KERNELS_SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")


def source_triton_kernels_shadows() -> bool:
    """True when ``import triton_kernels`` would resolve to this repository's kernels folder.

    That happens only when the repository root is on ``sys.path`` (``python -m ...`` run from it)
    and no real ``triton_kernels`` package is installed: the folder then imports as an empty
    namespace package, and vLLM (which probes for ``triton_kernels`` for its MoE kernels) would
    take it for the real one.
    """
    if "triton_kernels" in sys.modules:
        mod = sys.modules["triton_kernels"]
        paths = list(getattr(mod, "__path__", []) or []) if mod is not None else []
    else:
        spec = importlib.util.find_spec("triton_kernels")
        if spec is None:
            return False
        paths = list(spec.submodule_search_locations or [])
        if spec.origin not in (None, "namespace"):
            return False
    return any(os.path.realpath(p) == os.path.realpath(_KERNELS_SOURCE_DIR) for p in paths)


def hide_source_triton_kernels() -> None:
    """Make ``triton_kernels`` unimportable when only our source folder would provide it.

    Our kernels install as ``blockattn_kernels``; a ``None`` entry in ``sys.modules`` makes
    ``find_spec`` return None and imports raise ImportError, which is what vLLM expects when the
    package is absent.
    """
    if source_triton_kernels_shadows():
        sys.modules["triton_kernels"] = None
