"""Shared by the benchmark scripts in ``eval/``: the default random model and the machine's description."""

from __future__ import annotations

import os
import platform


def default_bench_model(path: str) -> str:
    """A random 8-layer x 512-wide Qwen3 (8 heads, 4 KV heads, head_dim 64) at ``path``, built once.

    Random weights: the benchmarks measure compute, not answer quality."""
    from vllm_blockattn.tiny import build_tiny_model

    if not os.path.exists(os.path.join(path, "config.json")):
        build_tiny_model(path, "qwen3", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                         intermediate_size=1536, max_position_embeddings=40960)
    return path


def cpu_model() -> str:
    """The CPU's model name (ratios between systems depend on it: report it with every figure)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
