"""Worker side: per-request layouts, block-aware positions, and the one channel from the scheduler to
the attention metadata builders.

The channel, hop by hop (no other path carries a layout):

1. The scheduler (engine core) attaches ``{request id: PagedLayout}`` for the requests a worker has not
   seen yet (new or resumed) to vLLM's ``SchedulerOutput`` (attribute ``core.paged.SCHEDULER_OUTPUT_ATTR``),
   which reaches every worker (pickled under tensor parallelism) and which no client can write. Requests
   themselves carry no layout; a request the scheduler did not mark is an ordinary request.
2. The worker (``BlockAttnCPUWorker`` / ``BlockAttnGPUWorker``, this module) keeps them in its own
   :class:`RowLayouts` and, for the duration of ``execute_model``, publishes the step it executes to
   this thread (:func:`executing`).
3. The attention metadata builders, which see no token ids and no request ids, ask
   :func:`batch_layouts` for the layouts of the rows of that step (row ``i`` is request
   ``input_batch.req_ids[i]``). Outside a step (profiling, warm-up, CUDA graph capture) every row is
   an ordinary row.

Positions have no public hook. The runner's ``_prepare_inputs`` computes the slot mapping from vLLM's
positions (slot indices, on the device) and leaves them in ``runner.positions``; editing
``runner.positions[:n]`` in place after it returns changes only the RoPE positions: block-local for
non-final blocks (so their cached keys are canonical), logical for the final block and generated tokens
(pads take no position). The edit runs on the device from per-row shifts written once per request
(:class:`~.positions.BlockPositions`): no per-token host work and no host-to-device copy per step. The
wrap is installed on the runner instance by the worker (listed in ``plugin.py``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch

from ..core.paged import SCHEDULER_OUTPUT_ATTR, PagedLayout
from .positions import BlockPositions

# The step a worker executes in this thread: (its vLLM config, rows -> layouts). Two engines may live
# in one process; a builder only reads the step of its own engine.
_STEP = threading.local()


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


@contextlib.contextmanager
def executing(vllm_config, rows: Callable[[int], list[PagedLayout | None]]):
    """Publish, for the duration of one step in this thread, the layouts of the rows of the batch the
    engine of ``vllm_config`` executes; ``rows(n)`` returns those of rows 0..n-1."""
    saved = getattr(_STEP, "current", None)
    _STEP.current = (vllm_config, rows)
    try:
        yield
    finally:
        _STEP.current = saved


def batch_layouts(vllm_config, num_reqs: int) -> list[PagedLayout | None]:
    """Layout of rows 0..num_reqs-1 of the batch being executed for ``vllm_config`` (None: ordinary
    request or padding row); empty outside a step."""
    step = getattr(_STEP, "current", None)
    if step is None or step[0] is not vllm_config:
        return []
    return step[1](num_reqs)


def _row_layouts(runner, layouts: RowLayouts) -> Callable[[int], list[PagedLayout | None]]:
    def rows(num_reqs: int) -> list[PagedLayout | None]:
        ib = runner.input_batch
        return [layouts.get(ib.req_ids[i]) if i < ib.num_reqs else None for i in range(num_reqs)]

    return rows


def _install(runner, layouts: RowLayouts) -> None:
    from vllm.platforms import current_platform

    from .._vllm_api import ensure_compatible

    ensure_compatible(current_platform.is_cpu())  # worker processes may run another vLLM than the frontend
    if current_platform.is_cpu():
        from . import cpu_kernels

        cpu_kernels.load()  # built once per machine; at start-up rather than inside the first request
    if not hasattr(runner, "_prepare_inputs") or not hasattr(runner, "input_batch"):
        raise RuntimeError("the blockattn backend needs vLLM's V1 model runner; it selects it by itself unless "
                           "VLLM_USE_V2_MODEL_RUNNER=1 is set: unset it or set it to 0")
    original = runner._prepare_inputs
    rows = _row_layouts(runner, layouts)
    block_positions: list[BlockPositions] = []   # made at the first block step: the page size is final by then

    def _prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if len(layouts):   # a live block request: its tokens' positions, on the device (rows' shifts kept)
            if not block_positions:
                block_positions.append(BlockPositions(runner.cache_config.block_size, runner.positions.device,
                                                      max_rows=runner.max_num_reqs))
            block_positions[0].apply(runner.positions, runner.query_start_loc.gpu,
                                     rows(runner.input_batch.num_reqs), scheduler_output.total_num_scheduled_tokens)
        return result

    runner._prepare_inputs = _prepare_inputs


class _BlockWorkerMixin:
    """What both workers add: the layouts of their live block requests and the step channel."""

    _blockattn_worker = True

    def init_device(self):
        super().init_device()
        self._blockattn_layouts = RowLayouts()
        _install(self.model_runner, self._blockattn_layouts)

    def execute_model(self, scheduler_output, *args, **kwargs):
        layouts, runner = self._blockattn_layouts, self.model_runner
        layouts.update(scheduler_output)
        with executing(runner.vllm_config, _row_layouts(runner, layouts)):
            out = super().execute_model(scheduler_output, *args, **kwargs)
        if len(layouts) > len(runner.requests):
            layouts.prune(runner.requests)
        return out


def _worker_classes():
    from vllm.v1.worker.cpu_worker import CPUWorker

    class BlockAttnCPUWorker(_BlockWorkerMixin, CPUWorker):
        """CPU worker whose model runner knows block layouts."""

    classes = {"BlockAttnCPUWorker": BlockAttnCPUWorker}
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except Exception:  # the CPU build may not import the GPU worker
        return classes

    class BlockAttnGPUWorker(_BlockWorkerMixin, Worker):
        """GPU worker whose model runner knows block layouts."""

    classes["BlockAttnGPUWorker"] = BlockAttnGPUWorker
    return classes


def __getattr__(name):
    # Resolved lazily: importing vLLM's worker modules is heavy and platform-specific.
    classes = _worker_classes()
    if name in classes:
        globals().update(classes)
        return classes[name]
    raise AttributeError(name)
