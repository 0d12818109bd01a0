"""Shared fixtures: tiny models are built once per session, nothing downloads."""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _import_tools() -> None:
    """The repository's ``tools/`` (test kits and device scripts, not installed) as the package
    ``tools``, without putting the repository root on ``sys.path`` (where its ``triton_kernels/``
    folder could pass for vLLM's package of that name)."""
    root = Path(__file__).resolve().parents[1] / "tools"
    if "tools" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tools", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["tools"] = module
        spec.loader.exec_module(module)


_import_tools()


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    from vllm_blockattn.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", sharpen=4.0)


@pytest.fixture(scope="session")
def tiny_sinkfree(tmp_path_factory):
    """A Block-FT-style checkpoint: no sinks, one ``<|block_boundary|>`` per block (num_sinks 0)."""
    from vllm_blockattn.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sinkfree"), "qwen3", sharpen=4.0, num_sinks=0)


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


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BertModel with the offline byte-level tokenizer (cls/sep = ChatML specials):
    the segmenter tests' encoder backbone."""
    import torch
    from transformers import BertConfig, BertModel

    from vllm_blockattn.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = build_tokenizer()
    tok.add_special_tokens({"cls_token": "<|im_start|>", "sep_token": "<|im_end|>"})
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    cfg.architectures = ["BertModel"]
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def segment_server(tiny_qwen3, tmp_path_factory):
    """One real server with the server's segmentation default on (``tests._server.SEGMENT_SERVER``),
    per-request cache details and the preload endpoint, shared by the documents, segmentation-safety
    and preload modules (a server start costs tens of seconds)."""
    import json

    from tests._server import SEGMENT_SERVER, serve

    extra = ("--enable-prompt-tokens-details", "--additional-config",
             json.dumps({"blockattn": {"segment": SEGMENT_SERVER}}))
    # VLLM_PLUGINS names the plugin: vLLM then loads its endpoint plugin too (POST /v1/blocks)
    with serve(tiny_qwen3, tmp_path_factory.mktemp("segment-server"), *extra,
               env={"VLLM_PLUGINS": "blockattn"}) as srv:
        yield srv


@pytest.fixture(scope="session")
def plain_server(tiny_qwen3, tmp_path_factory):
    """One real server with the defaults (``tests._server.serve``), shared by the modules that need
    nothing else (a server start costs tens of seconds); each module checks deltas, not totals."""
    from tests._server import serve

    with serve(tiny_qwen3, tmp_path_factory.mktemp("plain-server")) as srv:
        yield srv
