"""Shared fixtures: tiny models are built once per session, nothing downloads."""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    from vllm_blockattn.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", sharpen=4.0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from vllm_blockattn.tiny import build_tiny_model

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", sharpen=4.0, rope_scaling=rope)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small CPU models run several times faster with one thread on the shared 2-core machines."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
