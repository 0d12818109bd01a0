"""Cooperative checkpoints in the segmenter's long loops.

Segmenting a text runs Python loops (window layout, one iteration per candidate) and backbone
forwards (a few windows at a time). A caller that shares one segmenter among many clients (the
server's segmentation service) needs to stop that work when its client is gone or over budget, and
to let another request's work run between two steps. It installs a hook for the current thread with
:func:`checkpoints`; the segmenter calls :func:`checkpoint` between steps; the hook may pause (hand
the turn to another request and wait for its next one) or raise (the work stops there, nothing is
half-written: the segmenter keeps no state of an unfinished text). Without a hook, a checkpoint is a
no-op, so offline callers see no change.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

_HOOK: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "blockattn_segmenter_checkpoint", default=None)


def checkpoint() -> None:
    """A point between two steps of segmentation work: run the installed hook, if any."""
    hook = _HOOK.get()
    if hook is not None:
        hook()


@contextlib.contextmanager
def checkpoints(hook: Callable[[], None]) -> Iterator[None]:
    """Run ``hook`` at every :func:`checkpoint` of the segmentation work done inside this block."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)
