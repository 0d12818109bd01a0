"""What the blockattn backend implements exactly, and the start-up refusal of everything else.

The backend's kernels compute one attention: softmax(q k^T * scale) v over full (not windowed)
causal context, with rotary position embeddings (NeoX layout, over the whole head, a pure rotation by
position: default or llama3 frequencies) applied before the KV cache, so that a cached block's keys can
be moved to another offset by one more rotation. A model or setting that changes any of this would run
through paths that ignore the change and answer silently wrong, so it is refused when the engine is
configured, with an error that names it. :func:`unsupported_features` is the single list; docs/plugin.md
shows it as a table.
"""

from __future__ import annotations

# Architectures whose attention is exactly the one above (checked by reading their vLLM model code):
# standard scaled softmax, NeoX-style full-dimension RoPE before the cache, no sinks, no soft-capping.
# The feature checks below still apply to them (a Mistral or Qwen2 checkpoint may set a sliding window).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)

SUPPORTED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32")

_DEFAULT_SCHEDULERS = (None, "vllm.v1.core.sched.scheduler.Scheduler", "vllm.v1.core.sched.async_scheduler.AsyncScheduler")


def unsupported_features(vllm_config) -> list[str]:
    """Every reason the blockattn backend cannot run ``vllm_config`` exactly (empty: it can)."""
    problems: list[str] = []
    model = vllm_config.model_config
    if model is not None:
        problems += _model_problems(model)
    cache = vllm_config.cache_config
    if str(cache.cache_dtype) not in SUPPORTED_KV_CACHE_DTYPES:
        problems.append(f"KV cache dtype {cache.cache_dtype!r} (quantized KV caches are not implemented; "
                        f"supported: {', '.join(SUPPORTED_KV_CACHE_DTYPES)})")
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        problems.append(f"pipeline parallelism (pipeline_parallel_size={par.pipeline_parallel_size}); "
                        "tensor and data parallelism are supported")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(par, name, 1) > 1:
            problems.append(f"context parallelism ({name}={getattr(par, name)})")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    attn = vllm_config.attention_config
    if getattr(attn, "hisparse_config", None) is not None:
        problems.append("HiSparse attention (it needs the V2 model runner)")
    if getattr(vllm_config, "watermark_config", None) is not None:
        problems.append("watermarking (it needs the V2 model runner)")
    if _env_v2_runner():
        problems.append("VLLM_USE_V2_MODEL_RUNNER=1 (the backend runs on vLLM's V1 model runner, which it "
                        "selects by itself: unset the variable)")
    sched = vllm_config.scheduler_config.scheduler_cls
    if sched not in _DEFAULT_SCHEDULERS and not _is_ours(sched, "scheduler"):
        problems.append(f"a user-named scheduler class ({_name(sched)}): the backend installs its own "
                        "(vllm_blockattn.engine.scheduler.BlockAttnScheduler); subclass it to customize")
    worker = vllm_config.parallel_config.worker_cls
    if worker != "auto" and not _is_ours(worker, "worker"):
        problems.append(f"a user-named worker class ({_name(worker)}): the backend installs its own "
                        "(vllm_blockattn.worker.hooks.BlockAttnCPUWorker / BlockAttnGPUWorker); subclass it to customize")
    return problems


def _model_problems(model) -> list[str]:
    problems = []
    archs = list(getattr(model, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        problems.append(f"architecture {', '.join(archs) or '(none)'}: supported are "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if getattr(model, "runner_type", "generate") != "generate":
        problems.append(f"runner {model.runner_type!r} (only generative models)")
    for flag, what in (("use_mla", "multi-head latent attention (MLA)"), ("is_hybrid", "hybrid attention/SSM layers"),
                       ("is_attention_free", "attention-free layers"), ("is_encoder_decoder", "encoder-decoder models"),
                       ("uses_mrope", "multimodal rotary embeddings (M-RoPE)")):
        if _flag(model, flag):
            problems.append(what)
    hf = model.hf_text_config
    window = model.get_sliding_window() if hasattr(model, "get_sliding_window") else getattr(hf, "sliding_window", None)
    layer_types = [t for t in (getattr(hf, "layer_types", None) or []) if t != "full_attention"]
    if window is not None or layer_types:
        problems.append(f"sliding-window attention (sliding_window={window}, layer types {sorted(set(layer_types))})")
    if getattr(hf, "attn_logit_softcapping", None):
        problems.append(f"attention logit soft-capping (attn_logit_softcapping={hf.attn_logit_softcapping})")
    if getattr(hf, "attention_chunk_size", None):
        problems.append(f"chunked local attention (attention_chunk_size={hf.attention_chunk_size})")
    if getattr(hf, "dual_chunk_attention_config", None):
        problems.append("dual chunk attention")
    if any(getattr(hf, name, False) for name in ("alibi", "use_alibi")) or \
            getattr(hf, "position_embedding_type", "rope") == "alibi":
        problems.append("ALiBi position biases")
    if getattr(hf, "sinks", None) is not None or getattr(hf, "use_attention_sinks", False) or \
            getattr(hf, "model_type", "") == "gpt_oss":
        problems.append("learned attention sinks")
    try:
        from ..core.rope import inv_freq_from_config

        inv_freq_from_config(hf, getattr(hf, "head_dim", None))
    except NotImplementedError as e:
        problems.append(str(e))
    if not (getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or hasattr(hf, "rope_theta")):
        problems.append("no rotary position embedding (block KV moves between offsets by re-rotating keys)")
    return problems


def _flag(model, name) -> bool:
    try:
        return bool(getattr(model, name, False))
    except Exception:  # noqa: BLE001 - a property that cannot be evaluated means the feature is absent
        return False


def _env_v2_runner() -> bool:
    import vllm.envs as envs

    return envs.VLLM_USE_V2_MODEL_RUNNER is True


def _name(cls_or_name) -> str:
    return cls_or_name if isinstance(cls_or_name, str) else f"{cls_or_name.__module__}.{cls_or_name.__qualname__}"


def _is_ours(cls_or_name, kind: str) -> bool:
    """True for the plugin's scheduler/worker classes and their subclasses."""
    if isinstance(cls_or_name, str):
        if cls_or_name.startswith("vllm_blockattn."):
            return True
        try:
            from vllm.utils.import_utils import resolve_obj_by_qualname

            cls = resolve_obj_by_qualname(cls_or_name)
        except Exception:  # noqa: BLE001 - an unresolvable class is not ours; vLLM reports it later
            return False
    else:
        cls = cls_or_name
    marker = "_blockattn_scheduler" if kind == "scheduler" else "_blockattn_worker"
    return bool(getattr(cls, marker, False))


def check_supported(vllm_config) -> None:
    """Raise ValueError naming every unsupported model feature or setting."""
    problems = unsupported_features(vllm_config)
    if problems:
        raise ValueError("the blockattn attention backend cannot run this configuration exactly; unsupported: "
                         + "; ".join(problems) + ". See docs/plugin.md (supported features).")
