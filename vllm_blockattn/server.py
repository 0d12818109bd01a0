"""Block prompts built by the server: documents as blocks and automatic segmentation.

A client of ``vllm serve MODEL --attention-backend blockattn`` gets block attention without building
sink-token text itself:

- ``/v1/chat/completions``: vLLM's ``documents`` field. Each document becomes one context block, placed
  at the start of the last user message; the chat template's tokens before that message's content
  (system prompt, earlier turns, the user header) form a block of their own, as with a hand-built
  prompt, and the user's text, the template's tail and the answer form the final block;
- ``/v1/completions``: the same ``documents`` field as an extension (``extra_body``); the ``prompt``
  is the final block;
- both: ``"segment": "auto"`` (or ``{"threshold": ..., "depth": ...}``) has the server's segmenter
  cut the long parts: every document, the chat history before the last user message, and the
  message (or completion prompt) itself, whose last piece stays in the final block. ``"segment":
  "off"`` opts out of a server default.

A server can make automatic segmentation its default for long ordinary prompts::

    --additional-config '{"blockattn": {"segment": {"default": "auto", "min_tokens": 2048}}}'

(keys: ``model`` a segmenter checkpoint, default the packaged one; ``threshold``; ``depth``;
``default`` ``"off"`` or ``"auto"``; ``min_tokens``, the prompt length from which the default applies).

Everything here runs in the API-server process, before the engine sees the request: the prompt the
engine receives is exactly ``build_block_prompt(blocks, prefix=...)`` of the blocks named above, so
the engine's checks, cache keys and results are those of any block prompt. The segmenter is loaded
once per process, runs on its own thread (never on the event loop) and segments the texts of
concurrent requests together; its time per request is the ``vllm_blockattn:segmentation_seconds``
histogram on ``/metrics``. Requests that send neither field are untouched.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .layout import BlockLayoutError, BlockSettings, build_block_prompt

logger = logging.getLogger("vllm_blockattn")

SEGMENT_KEYS = {"threshold", "depth"}
SERVER_SEGMENT_KEYS = {"model", "threshold", "depth", "default", "min_tokens"}
DOCUMENT_KEYS = {"text", "title"}
MAX_DOCUMENTS = 4096
MAX_DEPTH = 8  # segmentation levels a request may ask for
# Characters a request may carry in documents and prompt, per token of the model's window: generous
# (tokens are 3-5 characters of text), it only stops a request from making the server tokenize or
# segment megabytes before the length check could reject it.
MAX_CHARS_PER_TOKEN = 32


class BlockRequestError(ValueError):
    """A malformed ``documents`` or ``segment`` field; the server answers 400 naming it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


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
        return cls(model, opts.threshold, opts.depth, default, min_tokens)


def _segment_knobs(entry: dict, what: str) -> SegmentOptions:
    from .segmenter.api import thresholds_for
    from .segmenter.candidates import SegmenterInputError

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
        if not text.strip():
            raise BlockRequestError(f"documents[{i}] is empty", "documents")
        out.append(text)
    return out or None


# -- the segmenter service -------------------------------------------------------------------------


class SegmenterService:
    """One segmenter per process, on its own thread: requests queue their texts, the thread takes
    everything queued and segments it together, and each request's future resolves on its event loop.
    The event loop never runs the model."""

    def __init__(self, config: ServerSegmentConfig):
        self.config = config
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._segmenter = None
        self._prefix_cache = None  # PrefixScoreCache, built with the segmenter (one level, content windows)
        self._load_error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="blockattn-segmenter", daemon=True)
        self._thread.start()

    async def cut(self, texts: Sequence[str], options: SegmentOptions) -> list[list[str]]:
        """Blocks of every text (each list concatenates to its text)."""
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        started = time.perf_counter()
        self._jobs.put((loop, future, list(texts), options))
        try:
            return await future
        finally:
            _observe_segmentation(time.perf_counter() - started, sum(map(len, texts)))

    def _load(self):
        if self._segmenter is None and self._load_error is None:
            try:
                from .segmenter.api import load_segmenter

                self._segmenter = load_segmenter(self.config.model)
                logger.info("blockattn: segmenter loaded (%s)", self.config.model or "packaged default")
            except Exception as e:  # noqa: BLE001 - reported to every request that asks for segmentation
                self._load_error = e
                logger.error("blockattn: the segmenter could not be loaded: %s", e)
        if self._load_error is not None:
            raise BlockRequestError(f"automatic segmentation is not available on this server: the segmenter "
                                    f"could not be loaded ({self._load_error})", "segment")
        return self._segmenter

    def _run(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while True:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._serve(batch)

    def _serve(self, batch: list) -> None:
        """Segment every job of ``batch``: jobs with the same thresholds are scored together (one batch
        of windows per level across requests, ``segment_cuts_many``); a failure fails its jobs only."""
        groups: dict[tuple, list] = {}
        for job in batch:
            loop, future, texts, options = job
            try:
                thresholds = self._resolve(options)
                groups.setdefault(tuple(thresholds), []).append(job)
            except Exception as e:  # noqa: BLE001 - the request fails, the thread goes on
                loop.call_soon_threadsafe(_settle, future, e, False)
        for thresholds, jobs in groups.items():
            try:
                texts = [t for job in jobs for t in job[2]]
                blocks = self._segment(self._segmenter, texts, list(thresholds))
                results, i = [], 0
                for job in jobs:
                    results.append(blocks[i : i + len(job[2])])
                    i += len(job[2])
                outcome = [(r, True) for r in results]
            except Exception as e:  # noqa: BLE001
                outcome = [(e, False)] * len(jobs)
            for (loop, future, _texts, _options), (result, ok) in zip(jobs, outcome):
                loop.call_soon_threadsafe(_settle, future, result, ok)

    def _resolve(self, options: SegmentOptions):
        from .segmenter.api import thresholds_for
        from .segmenter.candidates import SegmenterInputError

        seg = self._load()
        threshold = options.threshold if options.threshold is not None else self.config.threshold
        depth = options.depth if options.depth is not None else self.config.depth
        if threshold is None:
            threshold = seg.config.threshold
        try:
            return thresholds_for(threshold, depth)
        except SegmenterInputError as e:
            raise BlockRequestError(f"`segment`: {e}", "segment") from None

    def _segment(self, seg, texts: list[str], thresholds: list[float]) -> list[list[str]]:
        from .segmenter.api import cuts_at, segment_cuts
        from .segmenter.candidates import split_at

        if (len(thresholds) == 1 and hasattr(seg, "candidate_features_many")
                and getattr(seg, "receptive_field", lambda: None)() is not None):
            # one level with content windows: a text that extends one seen before (a chat history)
            # is scored from its new end only (PrefixScoreCache; same cuts as scoring it whole)
            if self._prefix_cache is None:
                from .segmenter.incremental import PrefixScoreCache

                self._prefix_cache = PrefixScoreCache(seg)
            scored = self._prefix_cache.probs_many([t for t in texts if t])
            it = iter(scored)
            out = []
            for t in texts:
                if not t:
                    out.append([])
                    continue
                cands, probs = next(it)
                out.append(split_at(t, cuts_at(t, cands, probs, thresholds[0])))
            return out
        if hasattr(seg, "candidate_probs_many"):
            from .segmenter.api import segment_cuts_many

            cuts = segment_cuts_many(texts, seg, thresholds)
        else:
            cuts = [segment_cuts(t, seg, thresholds) if t else [] for t in texts]
        return [split_at(t, c) if t else [] for t, c in zip(texts, cuts)]


def _settle(future, result, ok: bool) -> None:
    if future.done():  # the request was cancelled (client gone)
        return
    if ok:
        future.set_result(result)
    else:
        future.set_exception(result)


_METRICS = None


def _observe_segmentation(seconds: float, chars: int) -> None:
    global _METRICS
    try:
        if _METRICS is None:
            from prometheus_client import Counter, Histogram

            _METRICS = (
                Histogram("vllm_blockattn:segmentation_seconds",
                          "Wall time of a request's automatic segmentation in the API server (queue included)",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
                Counter("vllm_blockattn:segmented_chars", "Characters of text cut by the server's segmenter"),
            )
        _METRICS[0].observe(seconds)
        _METRICS[1].inc(chars)
    except Exception:  # noqa: BLE001 - metrics never fail a request
        logger.debug("blockattn: segmentation metrics unavailable", exc_info=True)


_SERVICES: dict[ServerSegmentConfig, SegmenterService] = {}
_SERVICES_LOCK = threading.Lock()


def segmenter_service(config: ServerSegmentConfig) -> SegmenterService:
    with _SERVICES_LOCK:
        svc = _SERVICES.get(config)
        if svc is None:
            svc = _SERVICES[config] = SegmenterService(config)
        return svc


# -- building the prompt ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerBlocks:
    """What the API server needs to build block prompts: the engine's sink settings, the segmenter
    configuration and the model window (to refuse oversized inputs before any work)."""

    settings: BlockSettings
    segment: ServerSegmentConfig
    max_model_len: int

    def check_size(self, texts: Sequence[str]) -> None:
        limit = self.max_model_len * MAX_CHARS_PER_TOKEN
        total = sum(map(len, texts))
        if total > limit:
            raise BlockRequestError(f"documents and prompt hold {total} characters; at most {limit} "
                                    f"({MAX_CHARS_PER_TOKEN} per token of max_model_len={self.max_model_len}) are "
                                    f"accepted", "documents")


_SERVER_BLOCKS: dict[int, tuple[object, ServerBlocks]] = {}


def server_blocks(vllm_config) -> ServerBlocks:
    hit = _SERVER_BLOCKS.get(id(vllm_config))
    if hit is None or hit[0] is not vllm_config:
        from .config import get_block_config

        cfg = get_block_config(vllm_config)
        seg = ServerSegmentConfig.from_additional_config(vllm_config.additional_config)
        hit = _SERVER_BLOCKS[id(vllm_config)] = (vllm_config, ServerBlocks(cfg.settings, seg, cfg.max_model_len))
    return hit[1]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


async def _cut(blocks: ServerBlocks, texts: list[str], options: SegmentOptions | None) -> list[list[str]]:
    if options is None:
        return [[t] for t in texts]
    pieces = await segmenter_service(blocks.segment).cut(texts, options)
    return [[p for p in ps if p] or [t] for ps, t in zip(pieces, texts)]


def _resolve_segment(blocks: ServerBlocks, requested, num_tokens: int | None) -> SegmentOptions | None:
    """The request's own choice, else the server's default for prompts of ``min_tokens`` or more."""
    if requested == "off":
        return None
    if isinstance(requested, SegmentOptions):
        return requested
    if blocks.segment.default == "auto" and num_tokens is not None and num_tokens >= blocks.segment.min_tokens:
        return SegmentOptions()
    return None


async def completion_ids(blocks: ServerBlocks, tokenizer, prompt, documents, segment_field, *,
                         add_special_tokens: bool = True) -> list[int] | None:
    """The token ids of a completion request's block prompt, or None to leave the request alone."""
    documents = parse_documents(documents)
    requested = parse_segment(segment_field)
    if documents is None and requested is None and blocks.segment.default == "off":
        return None
    if not isinstance(prompt, str):
        if documents is None and requested is None:
            return None  # the server default only applies to a single text prompt
        raise BlockRequestError("`documents` and `segment` need `prompt` to be a single string (the final block)",
                                "prompt")
    blocks.check_size([prompt, *(documents or ())])
    if documents is None and requested is None:
        ids = _encode(tokenizer, prompt)
        if blocks.settings.sink_token_id in ids:
            return None  # already a block prompt: the server default leaves it as sent
        segment = _resolve_segment(blocks, None, len(ids))
        if segment is None:
            return None
    else:
        segment = _resolve_segment(blocks, requested, None)
    if not prompt:
        raise BlockRequestError("`prompt` (the final block) is empty", "prompt")
    head = tokenizer.encode("", add_special_tokens=True) if add_special_tokens else []
    if documents is not None:
        cut = await _cut(blocks, documents, segment)
        context, final = [p for ps in cut for p in ps], prompt
    else:
        if segment is None:
            return None  # segment "off" and no documents: an ordinary prompt
        (pieces,) = await _cut(blocks, [prompt], segment)
        context, final = pieces[:-1], pieces[-1]
    return _build(blocks, tokenizer, context, final, head)


def _build(blocks: ServerBlocks, tokenizer, context: list, final, prefix) -> list[int]:
    try:
        return build_block_prompt([*context, final], blocks.settings, tokenizer=tokenizer, prefix=prefix or None)
    except BlockLayoutError as e:
        msg = str(e)
        if "sink token" in msg:
            msg += " (the text of a request must not contain the block sink token: the server adds the sinks)"
        raise BlockRequestError(msg, "documents") from None


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
            if kind != "text":
                raise BlockRequestError(f"block prompts take text only; the last user message has a {kind!r} part",
                                        "messages")
            parts.append(part["text"] if isinstance(part, dict) else part.text)
        return "".join(parts)
    raise BlockRequestError("the last user message has no text content", "messages")


def last_user_index(messages) -> int:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        if role == "user":
            return i
    raise BlockRequestError("`documents` and `segment` need a user message (the documents go into the last one)",
                            "messages")


def chat_placeholder_messages(messages, index: int, sink_token: str):
    """The conversation with the last user message's content replaced by one sink token: rendering it
    shows where the content sits in the template, whatever the template is."""
    m = messages[index]
    content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
    text = _message_text(content)
    replaced = dict(m) if isinstance(m, dict) else m.model_copy(update={"content": sink_token})
    if isinstance(replaced, dict):
        replaced["content"] = sink_token
    return [*messages[:index], replaced, *messages[index + 1:]], text


async def chat_ids(blocks: ServerBlocks, tokenizer, rendered_ids: list[int], text: str, documents,
                   requested) -> list[int]:
    """The chat prompt's token ids from the template rendered with a one-sink placeholder.

    Raises LookupError when there is nothing to do (no documents, and the server's default
    segmentation does not apply to a prompt this short): the request is then rendered as sent."""
    sink = blocks.settings.sink_token_id
    where = [i for i, t in enumerate(rendered_ids) if t == sink]
    if len(where) != 1:
        raise BlockRequestError(
            "block chat prompts need the block sink token to appear nowhere in the messages and the chat template "
            f"to render the last user message once (found {len(where)} placeholders)", "messages")
    head, tail = rendered_ids[: where[0]], rendered_ids[where[0] + 1:]
    blocks.check_size([text, *(documents or ())])
    n = len(head) + len(tail) + len(_encode(tokenizer, text))
    segment = _resolve_segment(blocks, requested, n)
    if documents is None and segment is None:
        raise LookupError  # nothing to do: the caller renders the request as sent
    context: list = []
    prefix = head
    if segment is not None and head:
        head_text = tokenizer.decode(head)
        (pieces,) = await _cut(blocks, [head_text], segment)
        context.extend(pieces)
        prefix = None
    if documents is not None:
        for ps in await _cut(blocks, documents, segment):
            context.extend(ps)
    final_text = text
    if segment is not None and text:
        (pieces,) = await _cut(blocks, [text], segment)
        context.extend(pieces[:-1])
        final_text = pieces[-1]
    final = _encode(tokenizer, final_text) + tail if final_text else tail
    if not final:
        raise BlockRequestError("the final block (last user message and the template's tail) is empty", "messages")
    return _build(blocks, tokenizer, context, final, prefix)
