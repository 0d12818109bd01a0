"""Worker side: per-request layouts and block-aware positions.

The attention metadata builder sees no token ids and no request ids, so the worker class keeps a
handle on its model runner; the builder then reads row i's request (``input_batch.req_ids[i]``) and
its layout. Layouts come from the scheduler only: it attaches ``{request id: PagedLayout}`` for the
requests a worker has not seen yet (new or resumed) to vLLM's ``SchedulerOutput``, which reaches every
worker (pickled under tensor parallelism) and which no client can write. Requests themselves carry no
layout; a request the scheduler did not mark is an ordinary request.

Positions have no public hook. The runner's ``_prepare_inputs`` computes the slot mapping from vLLM's
positions (slot indices) and then fills ``runner.positions``; editing ``runner.positions[:n]`` in place
after it returns changes only the RoPE positions: block-local for non-final blocks (so their cached
keys are canonical), logical for the final block and generated tokens (pads take no position).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .paged import SCHEDULER_OUTPUT_ATTR, PagedLayout

# Model runners of this process, by their vLLM config (two engines may live in one process).
_RUNNERS: dict[int, weakref.ref] = {}


class RowLayouts:
    """Layouts of the runner's live block requests, as sent by the scheduler."""

    def __init__(self):
        self._layouts: dict[str, PagedLayout] = {}

    def update(self, scheduler_output) -> None:
        """Forget finished requests and requests (re)sent as new; take the layouts sent this step."""
        for rid in scheduler_output.finished_req_ids:
            self._layouts.pop(rid, None)
        for new in scheduler_output.scheduled_new_reqs:  # an id may be reused after an abort
            self._layouts.pop(new.req_id, None)
        sent = getattr(scheduler_output, SCHEDULER_OUTPUT_ATTR, None) or {}
        for rid, layout in sent.items():
            if not isinstance(layout, PagedLayout):
                raise TypeError(f"blockattn: scheduler sent a {type(layout).__name__} as the layout of {rid}")
            self._layouts[rid] = layout

    def prune(self, live_ids) -> None:
        """Drop layouts of requests the runner no longer holds (finished in a step without tokens)."""
        for rid in [r for r in self._layouts if r not in live_ids]:
            del self._layouts[rid]

    def get(self, req_id: str) -> PagedLayout | None:
        return self._layouts.get(req_id)

    def __len__(self) -> int:
        return len(self._layouts)


def current_runner(vllm_config):
    """The model runner that owns ``vllm_config``, once its blockattn worker has started."""
    ref = _RUNNERS.get(id(vllm_config))
    runner = None if ref is None else ref()
    return runner if runner is not None and runner.vllm_config is vllm_config else None


def batch_layouts(runner, num_reqs: int) -> list[PagedLayout | None]:
    """Layout of rows 0..num_reqs-1 of the batch being prepared (None: ordinary request / padding row)."""
    ib = runner.input_batch
    out: list[PagedLayout | None] = []
    for i in range(num_reqs):
        out.append(runner._blockattn_layouts.get(ib.req_ids[i]) if i < ib.num_reqs else None)
    return out


def _install(runner) -> None:
    if getattr(runner, "_blockattn_layouts", None) is not None:
        return
    from vllm.platforms import current_platform

    from ._vllm_api import ensure_compatible

    ensure_compatible(current_platform.is_cpu())  # worker processes may run another vLLM than the frontend
    if current_platform.is_cpu():
        from . import cpu_kernels

        cpu_kernels.load()  # built once per machine; at start-up rather than inside the first request
    if not hasattr(runner, "_prepare_inputs") or not hasattr(runner, "input_batch"):
        raise RuntimeError("the blockattn backend needs vLLM's V1 model runner; it selects it by itself unless "
                           "VLLM_USE_V2_MODEL_RUNNER=1 is set: unset it or set it to 0")
    runner._blockattn_layouts = RowLayouts()
    original = runner._prepare_inputs

    def _prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
        layouts = runner._blockattn_layouts
        layouts.update(scheduler_output)
        result = original(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if len(layouts) > len(runner.requests):
            layouts.prune(runner.requests)
        ib = runner.input_batch
        start = 0
        for i in range(ib.num_reqs):
            n = int(num_scheduled_tokens[i])
            layout = layouts.get(ib.req_ids[i])
            if layout is not None and n:
                slots = int(ib.num_computed_tokens_cpu[i]) + np.arange(n)
                pos = torch.from_numpy(layout.positions(slots))
                runner.positions[start : start + n].copy_(pos.to(runner.positions.dtype))
            start += n
        return result

    runner._prepare_inputs = _prepare_inputs
    for key in [k for k, ref in _RUNNERS.items() if ref() is None]:
        del _RUNNERS[key]
    _RUNNERS[id(runner.vllm_config)] = weakref.ref(runner)


def _worker_classes():
    from vllm.v1.worker.cpu_worker import CPUWorker

    class BlockAttnCPUWorker(CPUWorker):
        """CPU worker whose model runner knows block layouts."""

        _blockattn_worker = True

        def init_device(self):
            super().init_device()
            _install(self.model_runner)

    classes = {"BlockAttnCPUWorker": BlockAttnCPUWorker}
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except Exception:  # the CPU build may not import the GPU worker
        return classes

    class BlockAttnGPUWorker(Worker):
        """GPU worker whose model runner knows block layouts."""

        _blockattn_worker = True

        def init_device(self):
            super().init_device()
            _install(self.model_runner)

    classes["BlockAttnGPUWorker"] = BlockAttnGPUWorker
    return classes


def __getattr__(name):
    # Resolved lazily: importing vLLM's worker modules is heavy and platform-specific.
    classes = _worker_classes()
    if name in classes:
        globals().update(classes)
        return classes[name]
    raise AttributeError(name)
