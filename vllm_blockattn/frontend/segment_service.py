"""The API server's segmentation service: one segmenter per process, shared safely by many clients.

A request that asks for automatic segmentation (``"segment"``, or the server's default) hands its
texts to :class:`SegmenterService`. Every rule below holds whatever a client sends:

- **Bounded work.** Each request gets its own worker thread, but only one request's work runs at a
  time, and it runs in turns: the segmenter stops at a checkpoint between two steps (a few backbone
  windows, or a few dozen candidates of window layout, :mod:`.segmenter.work`), and when another
  request waits, the turn passes to it (first come, first served) and the first request queues for
  its next turn. An honest request therefore waits about one step per request ahead of it in the
  rotation, not for the largest request queued before it. A request may hold the turn for at most
  ``budget_seconds`` in all (its own cost), and may take at most ``timeout_seconds`` from arrival to
  result (queue included); past either, its work stops and it gets a clear error.
- **Bounded queue.** At most ``max_pending`` requests segment or wait at once; one more is refused at
  once with 503 (the client may retry), not queued without bound.
- **Cancellation.** A request whose client disconnects (vLLM cancels the handler) or that is aborted
  marks its job cancelled: queued work never starts, running work stops at the next checkpoint.
- **Failure isolation.** A job holds one request's texts only, so an exception fails that request
  alone; an unexpected one is logged and answered with a generic 500 that leaks no internals.
- **Per-tenant cache.** The incremental cache (:class:`.segmenter.incremental.PrefixScoreCache`) is
  keyed by the request's tenant (``cache_salt`` and model, as vLLM's prefix cache is keyed), and
  bounded in bytes (``cache_mib``).

Why one segmenter and one turn at a time, not a pool: the segmenter's backbone already runs each
forward on all of the process's intra-op threads, and on a CPU server the engine core needs the
cores too; two forwards at once would each run at about half speed, so a pool adds memory and
contention, not throughput. What a pool would give (one large request cannot hold everybody up) the
turns give without it.

Metrics on ``/metrics``: ``vllm_blockattn:segmentation_seconds`` (histogram, per request, queue
included), ``vllm_blockattn:segmented_chars_total``, ``vllm_blockattn:segmenter_scored_chars_total``
(characters run through the backbone: the rest came from the cache),
``vllm_blockattn:segmenter_pending`` (requests segmenting or waiting) and
``vllm_blockattn:segmentations_total{outcome}`` with outcome ``ok``, ``refused`` (queue full or input
too large before any work), ``cancelled``, ``timed_out`` (budget or timeout) or ``failed``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus

from ..core.request_options import SegmentLimits

logger = logging.getLogger("vllm.blockattn")  # under vLLM's logger: its handler and level

OUTCOMES = ("ok", "refused", "cancelled", "timed_out", "failed")


class SegmentationError(Exception):
    """Segmentation of one request did not complete; ``status`` and ``param`` go into its error
    response, ``outcome`` into ``vllm_blockattn:segmentations_total``."""

    def __init__(self, message: str, *, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = "segment",
                 outcome: str = "failed"):
        super().__init__(message)
        self.status, self.param, self.outcome = status, param, outcome


class _Stop(BaseException):
    """Raised at a checkpoint to stop a job's work (BaseException: no ``except Exception`` inside the
    segmenter swallows it)."""

    def __init__(self, error: SegmentationError):
        super().__init__(str(error))
        self.error = error


class _Job:
    _ids = itertools.count()

    def __init__(self, texts: list[str], options, tenant, loop, future, timeout: float):
        self.id = next(self._ids)
        self.texts, self.options, self.tenant = texts, options, tenant
        self.loop, self.future = loop, future
        self.arrived = time.monotonic()
        self.deadline = self.arrived + timeout
        self.used = 0.0  # seconds holding the turn
        self.turn_started = 0.0
        self.cancelled = threading.Event()


class _Turns:
    """One job runs at a time; a job that reaches a checkpoint while others wait hands the turn to
    the first of them and queues behind the others (round robin, first come first served)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._holder: _Job | None = None

    def _wait_for_turn(self, job: _Job) -> None:
        # called with the lock held and ``job`` queued
        while self._holder is not None or self._waiting[0] is not job:
            if job.cancelled.is_set() or time.monotonic() >= job.deadline:
                self._waiting.remove(job)
                self._cv.notify_all()
                return
            self._cv.wait(timeout=max(0.0, min(job.deadline - time.monotonic(), 1.0)))
        self._waiting.popleft()
        self._holder = job
        job.turn_started = time.monotonic()

    def acquire(self, job: _Job) -> bool:
        """Wait for ``job``'s first turn; False if it was cancelled or timed out meanwhile."""
        with self._cv:
            self._waiting.append(job)
            self._wait_for_turn(job)
            return self._holder is job

    def release(self, job: _Job) -> None:
        with self._cv:
            if self._holder is job:
                job.used += time.monotonic() - job.turn_started
                self._holder = None
                self._cv.notify_all()

    def pass_turn(self, job: _Job) -> bool:
        """At a checkpoint: let waiting jobs run, then take the turn again. False if ``job`` was
        cancelled or timed out while it waited (it then holds no turn)."""
        with self._cv:
            if not self._waiting:
                return True
            job.used += time.monotonic() - job.turn_started
            self._holder = None
            self._waiting.append(job)
            self._cv.notify_all()
            self._wait_for_turn(job)
            return self._holder is job

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def waiting(self) -> int:
        with self._cv:
            return len(self._waiting)


class SegmenterService:
    """One segmenter per process (per configuration), shared by every request of the API server.

    ``segment_fn(segmenter, texts, thresholds, cache, tenant) -> blocks per text`` does the work; it
    runs on the request's own thread, inside the turn rules of the module docstring."""

    def __init__(self, model: str | None, limits: SegmentLimits, segment_fn, resolve_fn):
        self.model, self.limits = model, limits
        self._segment_fn, self._resolve_fn = segment_fn, resolve_fn
        self._segmenter = None
        self._prefix_cache = None
        self._load_error: Exception | None = None
        self._load_lock = threading.Lock()
        self._turns = _Turns()
        self._pending = 0
        self._pending_lock = threading.Lock()

    # -- the event-loop side -----------------------------------------------------------------------

    async def cut(self, texts: Sequence[str], options, tenant=None) -> list[list[str]]:
        """Blocks of every text (each list concatenates to its text). Raises
        :class:`SegmentationError`; cancelling the awaiting task stops the work."""
        if not texts:
            return []
        with self._pending_lock:
            if self._pending >= self.limits.max_pending:
                _count("refused")
                raise SegmentationError(
                    f"the server's segmenter is busy ({self._pending} requests segmenting or waiting, at most "
                    f"{self.limits.max_pending}); retry later, or send `documents` already cut or `segment: off`",
                    status=HTTPStatus.SERVICE_UNAVAILABLE, outcome="refused")
            self._pending += 1
        _set_pending(self._pending)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = _Job(list(texts), options, tenant, loop, future, self.limits.timeout_seconds)
        thread = threading.Thread(target=self._work, args=(job,), name=f"blockattn-segmenter-{job.id}", daemon=True)
        try:
            thread.start()
        except RuntimeError as e:  # cannot start a thread: the process is out of resources
            self._done(job)
            raise SegmentationError(f"the server's segmenter cannot take more work now ({e})",
                                    status=HTTPStatus.SERVICE_UNAVAILABLE, outcome="refused") from None
        try:
            return await future
        except asyncio.CancelledError:
            job.cancelled.set()  # the client is gone: the job stops at its next checkpoint
            self._turns.wake()
            raise
        finally:
            _observe(time.monotonic() - job.arrived, sum(map(len, texts)))

    # -- the worker side ----------------------------------------------------------------------------

    def _load(self):
        with self._load_lock:
            if self._segmenter is None and self._load_error is None:
                try:
                    from ..segmenter.api import load_segmenter

                    self._segmenter = load_segmenter(self.model)
                    logger.info("blockattn: segmenter loaded (%s)", self.model or "packaged default")
                except Exception as e:  # noqa: BLE001 - reported to every request that asks for segmentation
                    self._load_error = e
                    logger.error("blockattn: the segmenter could not be loaded: %s", e)
            if self._load_error is not None:
                raise SegmentationError(f"automatic segmentation is not available on this server: the segmenter "
                                        f"could not be loaded ({self._load_error})",
                                        status=HTTPStatus.SERVICE_UNAVAILABLE)
            if self._prefix_cache is None and _incremental(self._segmenter):
                from ..segmenter.incremental import PrefixScoreCache

                self._prefix_cache = PrefixScoreCache(self._segmenter,
                                                      max_bytes=int(self.limits.cache_mib * (1 << 20)))
            return self._segmenter

    def _checkpoint(self, job: _Job) -> None:
        if not job.cancelled.is_set() and time.monotonic() < job.deadline:
            now = time.monotonic()
            if job.used + (now - job.turn_started) <= self.limits.budget_seconds:
                if self._turns.pass_turn(job):
                    return
        raise _Stop(self._stop_reason(job))

    def _stop_reason(self, job: _Job) -> SegmentationError:
        if job.cancelled.is_set():
            return SegmentationError("the request was cancelled", outcome="cancelled")
        if time.monotonic() >= job.deadline:
            return SegmentationError(
                f"automatic segmentation did not finish within the server's timeout of "
                f"{self.limits.timeout_seconds:g} s (the segmenter is busy); retry later, or send `documents` already "
                f"cut or `segment: off`", status=HTTPStatus.SERVICE_UNAVAILABLE, outcome="timed_out")
        return SegmentationError(
            f"automatic segmentation of this request needs more than the server's budget of "
            f"{self.limits.budget_seconds:g} s of segmenter time; send shorter texts, `documents` already cut, fewer "
            f"levels, or `segment: off`", outcome="timed_out")

    def _work(self, job: _Job) -> None:
        from ..segmenter.work import checkpoints

        try:
            seg = self._load()
            thresholds = self._resolve_fn(seg, job.options)
            if not self._turns.acquire(job):
                raise _Stop(self._stop_reason(job))
            try:
                with checkpoints(lambda: self._checkpoint(job)):
                    result = self._segment_fn(seg, job.texts, thresholds, self._prefix_cache, job.tenant)
            finally:
                self._turns.release(job)
            outcome, ok = result, True
        except _Stop as stop:
            outcome, ok = stop.error, False
        except SegmentationError as e:
            outcome, ok = e, False
        except Exception:  # noqa: BLE001 - this request fails alone; nothing internal reaches the client
            logger.exception("blockattn: automatic segmentation failed for one request")
            outcome, ok = SegmentationError("automatic segmentation failed on the server (an internal error, logged "
                                            "there); send `documents` already cut or `segment: off`",
                                            status=HTTPStatus.INTERNAL_SERVER_ERROR, param=None), False
        _count("ok" if ok else outcome.outcome)
        self._done(job)
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, outcome, ok)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def _done(self, job: _Job) -> None:
        with self._pending_lock:
            self._pending -= 1
            pending = self._pending
        _set_pending(pending)


def _incremental(seg) -> bool:
    return hasattr(seg, "candidate_features_many") and getattr(seg, "receptive_field", lambda: None)() is not None


def _settle(future, result, ok: bool) -> None:
    if future.done():  # the request was cancelled (client gone)
        return
    if ok:
        future.set_result(result)
    else:
        future.set_exception(result)


# -- metrics -----------------------------------------------------------------------------------------

_METRICS = None
_METRICS_LOCK = threading.Lock()


def _metrics():
    global _METRICS
    if _METRICS is None:
        with _METRICS_LOCK:
            if _METRICS is None:
                from prometheus_client import Counter, Gauge, Histogram

                _METRICS = {
                    "seconds": Histogram(
                        "vllm_blockattn:segmentation_seconds",
                        "Wall time of a request's automatic segmentation in the API server (queue included)",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
                    "chars": Counter("vllm_blockattn:segmented_chars", "Characters of text cut by the server's segmenter"),
                    "scored": Counter("vllm_blockattn:segmenter_scored_chars",
                                      "Characters run through the segmenter's backbone (the rest came from its cache)"),
                    "pending": Gauge("vllm_blockattn:segmenter_pending",
                                     "Requests segmenting or waiting for the server's segmenter",
                                     multiprocess_mode="livesum"),
                    "outcomes": Counter("vllm_blockattn:segmentations",
                                        "Requests handed to the server's segmenter, by outcome", ["outcome"]),
                }
                for o in OUTCOMES:
                    _METRICS["outcomes"].labels(outcome=o)
    return _METRICS


def _safely(fn) -> None:
    try:
        fn(_metrics())
    except Exception:  # noqa: BLE001 - metrics never fail a request
        logger.debug("blockattn: segmentation metrics unavailable", exc_info=True)


def _observe(seconds: float, chars: int) -> None:
    _safely(lambda m: (m["seconds"].observe(seconds), m["chars"].inc(chars)))


def _count(outcome: str) -> None:
    _safely(lambda m: m["outcomes"].labels(outcome=outcome).inc())


def _set_pending(n: int) -> None:
    _safely(lambda m: m["pending"].set(n))


def count_scored(chars: int) -> None:
    if chars:
        _safely(lambda m: m["scored"].inc(chars))


def count_refused() -> None:
    """A request refused before any segmentation (its input cannot fit the model)."""
    _count("refused")
