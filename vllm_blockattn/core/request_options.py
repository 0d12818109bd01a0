"""What a request and the server's configuration may say about documents and segmentation: parsing
and validation only (no vLLM, no server state), shared by the API server (``server.py``) and the
engine's start-up check of ``additional_config["blockattn"]["segment"]`` (``config.py``).

Every value here comes from a client or an operator and is treated as hostile: each check names the
field, and nothing is half-applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from .segment_settings import SegmenterInputError, thresholds_for

SEGMENT_KEYS = {"threshold", "depth"}
LIMIT_KEYS = ("budget_seconds", "timeout_seconds", "max_pending", "cache_mib")
SERVER_SEGMENT_KEYS = {"model", "threshold", "depth", "default", "min_tokens", *LIMIT_KEYS}
DOCUMENT_KEYS = {"text", "title"}
MAX_DOCUMENTS = 4096
MAX_DEPTH = 8  # segmentation levels a request may ask for
# Characters a request may carry in documents and prompt, per token of the model's window: generous
# (tokens are 3-5 characters of text), it only stops a request from making the server tokenize or
# segment megabytes before the length check could reject it.
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class SegmentLimits:
    """The segmentation service's bounds (``additional_config["blockattn"]["segment"]`` keys of the
    same names; docs/server.md, "Limits on a shared server")."""

    budget_seconds: float = 30.0  # segmenter time one request may use (its own turns)
    timeout_seconds: float = 120.0  # arrival to result, queue included
    max_pending: int = 32  # requests segmenting or waiting; one more gets 503
    cache_mib: float = 256.0  # the incremental cache's bound, MiB of what it stores


class BlockRequestError(ValueError):
    """A request the server cannot turn into a block prompt; the server answers ``status`` (400 for a
    malformed ``documents``, ``segment``, ``prompt`` or ``messages``, naming it in ``param``; 503
    when the segmenter is busy)."""

    def __init__(self, message: str, param: str | None, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.param, self.status = param, status

    @property
    def err_type(self) -> str:
        return {HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
                HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError"}.get(self.status, "BadRequestError")


def check_text(text: str, what: str, param: str, *, for_segmenter: bool = False) -> None:
    """Refuse text that tokenizers cannot take, naming the field: lone surrogates (valid JSON escapes
    such as ``"\\ud800"``, but not Unicode text) and, for text the segmenter reads, NUL characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BlockRequestError(f"{what} is not valid Unicode text: it holds a lone surrogate "
                                f"(U+{ord(text[e.start]):04X}) at character {e.start}; send UTF-8 text (a JSON string "
                                f"must not contain an unpaired \\ud800-\\udfff escape)", param) from None
    if for_segmenter and "\x00" in text:
        raise BlockRequestError(f"{what} holds a NUL character at character {text.index(chr(0))}; automatic "
                                f"segmentation takes text only", param)


# -- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentOptions:
    threshold: float | tuple[float, ...] | None = None
    depth: int | None = None


@dataclass(frozen=True)
class ServerSegmentConfig:
    """``additional_config["blockattn"]["segment"]``: the server's segmenter and its default."""

    model: str | None = None
    threshold: float | tuple[float, ...] | None = None
    depth: int | None = None
    default: str = "off"
    min_tokens: int = 2048
    limits: SegmentLimits = SegmentLimits()

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> ServerSegmentConfig:
        entry = ((additional_config or {}).get("blockattn") or {}).get("segment")
        if entry is None:
            return cls()
        if not isinstance(entry, dict):
            raise ValueError(f"additional_config['blockattn']['segment'] must be a mapping, got {entry!r}")
        unknown = set(entry) - SERVER_SEGMENT_KEYS
        if unknown:
            raise ValueError(f"unknown additional_config['blockattn']['segment'] keys {sorted(unknown)}; "
                             f"expected some of {sorted(SERVER_SEGMENT_KEYS)}")
        default = entry.get("default", "off")
        if default not in ("off", "auto"):
            raise ValueError(f"additional_config['blockattn']['segment']['default'] must be 'off' or 'auto', "
                             f"got {default!r}")
        min_tokens = entry.get("min_tokens", 2048)
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"additional_config['blockattn']['segment']['min_tokens'] must be a non-negative "
                             f"int, got {min_tokens!r}")
        model = entry.get("model")
        if model is not None and not isinstance(model, str):
            raise ValueError(f"additional_config['blockattn']['segment']['model'] must be a path, got {model!r}")
        try:
            opts = _segment_knobs(entry, "additional_config['blockattn']['segment']")
        except BlockRequestError as e:
            raise ValueError(str(e)) from None
        limits = {}
        for key in LIMIT_KEYS:
            if key not in entry:
                continue
            value, integral = entry[key], key == "max_pending"
            if (isinstance(value, bool) or not isinstance(value, int if integral else int | float)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"additional_config['blockattn']['segment']['{key}'] must be a positive "
                                 f"{'int' if integral else 'number'}, got {value!r}")
            limits[key] = value
        return cls(model, opts.threshold, opts.depth, default, min_tokens, SegmentLimits(**limits))


def _segment_knobs(entry: dict, what: str) -> SegmentOptions:
    threshold, depth = entry.get("threshold"), entry.get("depth")
    levels = len(threshold) if isinstance(threshold, list | tuple) else depth
    if isinstance(levels, int) and not isinstance(levels, bool) and levels > MAX_DEPTH:
        # each level re-scores every block of the level above: bound the work one request can ask for
        raise BlockRequestError(f"{what}: at most {MAX_DEPTH} levels of segmentation, got {levels}", "segment")
    try:
        if threshold is not None:
            if not isinstance(threshold, int | float | list | tuple) or isinstance(threshold, bool):
                raise SegmenterInputError(f"threshold must be a number or a list of numbers, got {threshold!r}")
            if isinstance(threshold, list | tuple) and not all(
                    isinstance(t, int | float) and not isinstance(t, bool) for t in threshold):
                raise SegmenterInputError(f"threshold must be a number or a list of numbers, got {threshold!r}")
            thresholds_for(threshold, depth)
            if isinstance(threshold, list | tuple):
                threshold = tuple(float(t) for t in threshold)
        elif depth is not None:
            thresholds_for(0.5, depth)
    except SegmenterInputError as e:
        raise BlockRequestError(f"{what}: {e}", "segment") from None
    return SegmentOptions(threshold, depth)


def parse_segment(value: Any) -> SegmentOptions | str | None:
    """A request's ``segment`` field: None (absent), ``"off"``, or the options of an automatic cut."""
    if value is None:
        return None
    if value == "off" or value is False:
        return "off"
    if value == "auto" or value is True:
        return SegmentOptions()
    if isinstance(value, dict):
        unknown = set(value) - SEGMENT_KEYS
        if unknown:
            raise BlockRequestError(f"unknown `segment` keys {sorted(unknown)}; expected some of "
                                    f"{sorted(SEGMENT_KEYS)}", "segment")
        return _segment_knobs(value, "`segment`")
    raise BlockRequestError(f"`segment` must be \"auto\", \"off\" or an object with {sorted(SEGMENT_KEYS)}, "
                            f"got {value!r}", "segment")


def parse_documents(value: Any) -> list[str] | None:
    """A request's ``documents``: strings, or objects with ``text`` and an optional ``title`` (the
    title goes on the block's first line). None or an empty list means no documents."""
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise BlockRequestError(f"`documents` must be a list, got {type(value).__name__}", "documents")
    if len(value) > MAX_DOCUMENTS:
        raise BlockRequestError(f"`documents` has {len(value)} entries; at most {MAX_DOCUMENTS} are accepted",
                                "documents")
    out = []
    for i, doc in enumerate(value):
        if isinstance(doc, str):
            text = doc
        elif isinstance(doc, dict):
            unknown = set(doc) - DOCUMENT_KEYS
            if unknown:
                raise BlockRequestError(f"documents[{i}] has unknown keys {sorted(unknown)}; a document is a string "
                                        f"or an object with 'text' and an optional 'title'", "documents")
            text, title = doc.get("text"), doc.get("title")
            if not isinstance(text, str):
                raise BlockRequestError(f"documents[{i}]['text'] must be a string, got {type(text).__name__}",
                                        "documents")
            if title is not None and not isinstance(title, str):
                raise BlockRequestError(f"documents[{i}]['title'] must be a string", "documents")
            if title:
                text = f"{title}\n{text}"
        else:
            raise BlockRequestError(f"documents[{i}] must be a string or an object, got {type(doc).__name__}",
                                    "documents")
        check_text(text, f"documents[{i}]", "documents")
        if not text.strip():
            raise BlockRequestError(f"documents[{i}] is empty", "documents")
        out.append(text)
    return out or None
