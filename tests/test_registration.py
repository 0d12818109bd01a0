"""Choosing the backend is all a user does: the plugin arranges the rest and touches nothing else."""

import pytest

vllm = pytest.importorskip("vllm")


def _config(path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=path, dtype="float32", max_model_len=1024, enforce_eager=True, **kwargs).create_engine_config()


@pytest.mark.parametrize("name", ["blockattn", "BlockAttn", "BLOCKATTN"])
def test_backend_name_any_case_sets_up_the_engine(tiny_qwen3, name):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cfg = _config(tiny_qwen3, attention_backend=name)
    assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == "vllm_blockattn.worker.backend_cpu.BlockAttnCPUBackend"
    assert cfg.scheduler_config.scheduler_cls.startswith("vllm_blockattn.engine.scheduler.BlockAttn")
    assert cfg.parallel_config.worker_cls == "vllm_blockattn.worker.hooks.BlockAttnCPUWorker"
    assert cfg.cache_config.block_size == 32


def test_other_backends_and_settings_untouched(tiny_qwen3):
    stock = _config(tiny_qwen3)
    block = _config(tiny_qwen3, attention_backend="blockattn")
    assert stock.scheduler_config.scheduler_cls in (None, "vllm.v1.core.sched.scheduler.Scheduler",
                                                    "vllm.v1.core.sched.async_scheduler.AsyncScheduler")
    assert stock.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
    for attr in ("max_model_len", "dtype"):
        assert getattr(stock.model_config, attr) == getattr(block.model_config, attr)
    assert stock.cache_config.enable_prefix_caching == block.cache_config.enable_prefix_caching
    assert stock.scheduler_config.max_num_batched_tokens == block.scheduler_config.max_num_batched_tokens
    # A user's own page size (a multiple of 32 on CPU) is kept.
    assert _config(tiny_qwen3, attention_backend="blockattn", block_size=64).cache_config.block_size == 64


def test_block_settings_come_from_config_and_overrides(tiny_qwen3):
    from vllm_blockattn.core.config import get_block_config

    cfg = get_block_config(_config(tiny_qwen3, attention_backend="blockattn"))
    assert (cfg.settings.sink_token_id, cfg.settings.num_sinks, cfg.page_size) == (3, 4, 32)
    over = get_block_config(_config(tiny_qwen3, attention_backend="blockattn",
                                    additional_config={"blockattn": {"sink_token": "<|im_start|>", "num_sinks": 2}}))
    assert (over.settings.sink_token_id, over.settings.num_sinks) == (1, 2)
    with pytest.raises(ValueError, match="unknown additional_config"):
        get_block_config(_config(tiny_qwen3, attention_backend="blockattn",
                                 additional_config={"blockattn": {"sinks": 2}}))


def test_model_without_sink_settings_needs_an_override(tmp_path):
    import json
    import os

    from vllm_blockattn.core.config import get_block_config
    from vllm_blockattn.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "plain", "llama")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    del cfg["block_attention"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="needs a sink token"):
        get_block_config(_config(path, attention_backend="blockattn"))
    ok = get_block_config(_config(path, attention_backend="blockattn",
                                  additional_config={"blockattn": {"sink_token": "<|endoftext|>"}}))
    assert ok.settings.sink_token_id == 0
