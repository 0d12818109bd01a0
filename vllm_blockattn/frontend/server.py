"""Block prompts built by the server: documents as blocks and automatic segmentation.

A client of ``vllm serve MODEL --attention-backend blockattn`` gets block attention without building
sink-token text itself (or, for a checkpoint trained without sinks, boundary-token text: every path
below places the engine's block markers, whichever layout the checkpoint uses):

- ``/v1/chat/completions``: vLLM's ``documents`` field. Each document becomes one context block, placed
  at the start of the last user message; the chat template's tokens before that message's content
  (system prompt, earlier turns, the user header) form a block of their own, as with a hand-built
  prompt, and the user's text, the template's tail and the answer form the final block;
- ``/v1/completions``: the same ``documents`` field as an extension (``extra_body``); the ``prompt``
  is the final block;
- both: ``"segment": "auto"`` (or ``{"threshold": ..., "depth": ...}``) has the server's segmenter
  cut the long parts: every document, and the last user message (or completion prompt) itself,
  whose last piece stays in the final block. A chat's history before the last user message is never
  cut: it stays the head block, ordinary KV on vLLM's prefix chain, reused turn after turn as stock
  prefix caching reuses it. When nothing is cut and there are no documents, the request stays an
  ordinary prompt. ``"segment": "off"`` opts out of a server default.

A server can make automatic segmentation its default for long ordinary prompts::

    --additional-config '{"blockattn": {"segment": {"default": "auto", "min_tokens": 2048}}}'

(keys: ``model`` a segmenter checkpoint, default the packaged one; ``threshold``; ``depth``;
``default`` ``"off"`` or ``"auto"``; ``min_tokens``, the prompt length from which the default applies).

Everything here runs in the API-server process, before the engine sees the request: the prompt the
engine receives is exactly ``build_block_prompt(blocks, prefix=...)`` of the blocks named above, so
the engine's checks, cache keys and results are those of any block prompt. The segmenter is loaded
once per process and shared safely by every client (``segment_service.py``: text that cannot fit the
model is refused before segmentation, requests take turns, a budget and a timeout bound each one, a
disconnected client's work stops, a failure stays with its request, the cache is per tenant). The
server's default is best effort: a request it cannot apply to is left as sent. Requests that send
neither field are untouched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.layout import BlockLayoutError, BlockSettings, build_block_prompt
from ..core.segment_settings import SegmenterInputError, thresholds_for
from ..core.request_options import (MAX_CHARS_PER_TOKEN, BlockRequestError, SegmentOptions, ServerSegmentConfig,
                              check_text, parse_documents, parse_segment)
from .segment_service import SegmentationError, SegmenterService, count_refused, count_scored

logger = logging.getLogger("vllm.blockattn")  # under vLLM's logger: its handler and level

# -- the segmenter service (segment_service.py holds its rules) ---------------------------------------


def _resolve_thresholds(seg, options: SegmentOptions) -> list[float]:
    """The request's thresholds, else the server's, else the checkpoint's own (runs once the
    segmenter is loaded; the server's configuration is bound in :func:`segmenter_service`)."""
    threshold, depth = options.threshold, options.depth
    if threshold is None:
        threshold = seg.config.threshold
    try:
        return thresholds_for(threshold, depth)
    except SegmenterInputError as e:
        raise SegmentationError(f"`segment`: {e}") from None


def _segment_texts(seg, texts: list[str], thresholds: list[float], cache, tenant) -> list[list[str]]:
    """One request's texts cut at ``thresholds`` (runs on the request's segmenter thread)."""
    from ..segmenter.api import cuts_at, segment_cuts, segment_cuts_many
    from ..segmenter.candidates import split_at

    if len(thresholds) == 1 and cache is not None:
        # one level with content windows: a text that extends one this tenant sent before (a prompt
        # that grows turn by turn) is scored from its new end only (PrefixScoreCache; same cuts as
        # scoring it whole)
        before = cache.scored_chars
        scored = iter(cache.probs_many([t for t in texts if t], tenant))
        count_scored(cache.scored_chars - before)
        out = []
        for t in texts:
            if t:
                cands, probs = next(scored)
                out.append(split_at(t, cuts_at(t, cands, probs, thresholds[0])))
            else:
                out.append([])
        return out
    count_scored(sum(map(len, texts)))
    if hasattr(seg, "candidate_probs_many"):
        cuts = segment_cuts_many(texts, seg, thresholds)
    else:
        cuts = [segment_cuts(t, seg, thresholds) if t else [] for t in texts]
    return [split_at(t, c) if t else [] for t, c in zip(texts, cuts)]


_SERVICES: dict[ServerSegmentConfig, SegmenterService] = {}
_SERVICES_LOCK = threading.Lock()


def new_segmenter_service(config: ServerSegmentConfig) -> SegmenterService:
    """A segmenter service for a server configuration (its segmenter loads on first use)."""

    def resolve(seg, options: SegmentOptions) -> list[float]:
        return _resolve_thresholds(seg, SegmentOptions(
            options.threshold if options.threshold is not None else config.threshold,
            options.depth if options.depth is not None else config.depth))

    return SegmenterService(config.model, config.limits, _segment_texts, resolve)


def segmenter_service(config: ServerSegmentConfig) -> SegmenterService:
    """The process's segmenter service for a server configuration (one per configuration)."""
    with _SERVICES_LOCK:
        svc = _SERVICES.get(config)
        if svc is None:
            svc = _SERVICES[config] = new_segmenter_service(config)
        return svc


# -- building the prompt ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerBlocks:
    """What the API server needs to build block prompts: the engine's sink settings, the segmenter
    configuration and the model window (to refuse oversized inputs before any work)."""

    settings: BlockSettings
    segment: ServerSegmentConfig
    max_model_len: int

    @property
    def max_chars(self) -> int:
        return self.max_model_len * MAX_CHARS_PER_TOKEN

    def check_size(self, texts: Sequence[str], param: str = "documents") -> None:
        """Refuse, before any tokenization, text far beyond what the model's window could hold."""
        total = sum(map(len, texts))
        if total > self.max_chars:
            raise BlockRequestError(f"documents and prompt hold {total} characters; at most {self.max_chars} "
                                    f"({MAX_CHARS_PER_TOKEN} per token of max_model_len={self.max_model_len}) are "
                                    f"accepted", param)

    def check_tokens(self, num_tokens: int, param: str) -> None:
        """Refuse, before any segmentation, a request whose text alone cannot fit the model: the
        segmenter's work is then bounded by what fits, whatever the text's shape."""
        if num_tokens > self.max_model_len:
            count_refused()
            raise BlockRequestError(f"this request's text is {num_tokens} tokens (documents, prompt and chat template, "
                                    f"before the block layout's sink tokens), more than the model's maximum context "
                                    f"length of {self.max_model_len} tokens; it was refused before segmentation", param)


_SERVER_BLOCKS: dict[int, tuple[object, ServerBlocks]] = {}


def server_blocks(vllm_config) -> ServerBlocks:
    hit = _SERVER_BLOCKS.get(id(vllm_config))
    if hit is None or hit[0] is not vllm_config:
        from ..core.config import get_block_config

        cfg = get_block_config(vllm_config)
        seg = ServerSegmentConfig.from_additional_config(vllm_config.additional_config)
        hit = _SERVER_BLOCKS[id(vllm_config)] = (vllm_config, ServerBlocks(cfg.settings, seg, cfg.max_model_len))
    return hit[1]


def tenant_of(request) -> tuple:
    """Whose texts a request's segmentation may find in the segmenter's cache: the request's
    ``cache_salt`` (vLLM's tenant boundary for its prefix cache) and its model (a LoRA adapter is
    served under a name of its own). Requests without a salt share the unsalted namespace, as in
    vLLM's prefix cache."""
    return (getattr(request, "cache_salt", None), getattr(request, "model", None))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _segmentable(text: str) -> bool:
    try:
        check_text(text, "text", "prompt", for_segmenter=True)
    except BlockRequestError:
        return False
    return True


async def cut_texts(blocks: ServerBlocks, texts: list[str], options: SegmentOptions | None, tenant) -> list[list[str]]:
    """Each text cut by the server's segmenter (``options``; None: each text whole), as one job of
    the segmentation service; a refusal is a BlockRequestError with its status."""
    if options is None:
        return [[t] for t in texts]
    try:
        pieces = await segmenter_service(blocks.segment).cut(texts, options, tenant)
    except SegmentationError as e:
        raise BlockRequestError(str(e), e.param, e.status) from None
    return [[p for p in ps if p] or [t] for ps, t in zip(pieces, texts)]


def _left_as_sent(error: Exception) -> None:
    logger.info("blockattn: the server's default segmentation left a request as sent: %s", error)


async def completion_ids(blocks: ServerBlocks, tokenizer, prompt, documents, segment_field, *,
                         add_special_tokens: bool = True, tenant=None) -> list[int] | None:
    """The token ids of a completion request's block prompt, or None to leave the request alone."""
    documents = parse_documents(documents)
    requested = parse_segment(segment_field)
    if documents is None and requested is None:
        if blocks.segment.default == "off" or not isinstance(prompt, str):
            return None  # the server default only applies to a single text prompt
        return await _completion_by_default(blocks, tokenizer, prompt, add_special_tokens, tenant)
    if not isinstance(prompt, str):
        raise BlockRequestError("`documents` and `segment` need `prompt` to be a single string (the final block)",
                                "prompt")
    segment = None if requested == "off" else requested
    if documents is None and segment is None:
        return None  # segment "off" and no documents: an ordinary prompt
    check_text(prompt, "`prompt`", "prompt", for_segmenter=segment is not None)
    param = "documents" if documents is not None else "prompt"
    blocks.check_size([prompt, *(documents or ())], param)
    if not prompt:
        raise BlockRequestError("`prompt` (the final block) is empty", "prompt")
    head = tokenizer.encode("", add_special_tokens=True) if add_special_tokens else []
    if segment is not None:
        for i, d in enumerate(documents or ()):
            check_text(d, f"documents[{i}]", "documents", for_segmenter=True)
        n = len(head) + len(_encode(tokenizer, prompt)) + sum(len(_encode(tokenizer, d)) for d in documents or ())
        blocks.check_tokens(n, param)
    if documents is not None:
        cut = await cut_texts(blocks, documents, segment, tenant)
        context, final = [p for ps in cut for p in ps], prompt
    else:
        (pieces,) = await cut_texts(blocks, [prompt], segment, tenant)
        context, final = pieces[:-1], pieces[-1]
        if not context:
            return None  # nothing was cut: the prompt stays an ordinary prompt
    return _build(blocks, tokenizer, context, final, head)


async def _completion_by_default(blocks: ServerBlocks, tokenizer, prompt: str, add_special_tokens: bool,
                                 tenant) -> list[int] | None:
    """The server's default segmentation of an ordinary prompt, best effort: a prompt it does not
    apply to (short, longer than the model's window, already a block prompt, text the segmenter
    cannot take) or cannot cut now (segmenter busy, over budget) is left as sent, so the request
    gets exactly what it would get from a server without the default."""
    if not prompt or len(prompt) > blocks.max_chars or not _segmentable(prompt):
        return None
    ids = _encode(tokenizer, prompt)
    head = tokenizer.encode("", add_special_tokens=True) if add_special_tokens else []
    if blocks.settings.marker_id in ids:
        return None  # already a block prompt: the server default leaves it as sent
    if not blocks.segment.min_tokens <= len(ids) or len(ids) + len(head) > blocks.max_model_len:
        return None
    try:
        (pieces,) = await cut_texts(blocks, [prompt], SegmentOptions(), tenant)
        if len(pieces) < 2:
            return None  # nothing was cut: the prompt stays an ordinary prompt
        return _build(blocks, tokenizer, pieces[:-1], pieces[-1], head)
    except BlockRequestError as e:
        _left_as_sent(e)
        return None


def _build(blocks: ServerBlocks, tokenizer, context: list, final, prefix) -> list[int]:
    try:
        return build_block_prompt([*context, final], blocks.settings, tokenizer=tokenizer, prefix=prefix or None)
    except BlockLayoutError as e:
        msg = str(e)
        if "sink token" in msg or "boundary token" in msg:
            name = blocks.settings.marker_name
            msg += f" (the text of a request must not contain the block {name}: the server marks the blocks)"
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


def check_messages(messages) -> None:
    """Refuse message text that tokenizers cannot take, naming ``messages`` (for requests that ask for
    documents or segmentation; an ordinary request gets vLLM's own handling)."""
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        for part in parts:
            text = part if isinstance(part, str) else (
                part.get("text") if isinstance(part, dict) else getattr(part, "text", None))
            if isinstance(text, str):
                check_text(text, f"messages[{i}]", "messages")


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
                   requested, *, tenant=None) -> list[int]:
    """The chat prompt's token ids from the template rendered with a one-sink placeholder.

    Raises LookupError when the request is to be rendered as sent: there is nothing to do (no
    documents, and the server's default segmentation does not apply to a prompt this short), or the
    default cannot apply to it (the conversation already holds sink tokens, the segmenter is busy,
    ...): the default never fails a request that would succeed without it."""
    if documents is None and requested is None:
        try:
            return await _chat_ids(blocks, tokenizer, rendered_ids, text, None, None, tenant, by_default=True)
        except BlockRequestError as e:
            _left_as_sent(e)
            raise LookupError from None
    return await _chat_ids(blocks, tokenizer, rendered_ids, text, documents, requested, tenant, by_default=False)


async def _chat_ids(blocks: ServerBlocks, tokenizer, rendered_ids, text, documents, requested, tenant, *,
                    by_default: bool) -> list[int]:
    marker = blocks.settings.marker_id
    where = [i for i, t in enumerate(rendered_ids) if t == marker]
    if len(where) != 1:
        raise BlockRequestError(
            f"block chat prompts need the block {blocks.settings.marker_name} to appear nowhere in the messages "
            "and the chat template "
            f"to render the last user message once (found {len(where)} placeholders)", "messages")
    head, tail = rendered_ids[: where[0]], rendered_ids[where[0] + 1:]
    segment = SegmentOptions() if by_default else (None if requested == "off" else requested)
    if by_default and not text:
        raise LookupError  # the default has nothing to cut: the history stays as it is
    check_text(text, "the last user message", "messages", for_segmenter=segment is not None)
    param = "documents" if documents is not None else "messages"
    blocks.check_size([text, *(documents or ())], param)
    text_ids = _encode(tokenizer, text)
    n = len(head) + len(tail) + len(text_ids)
    if by_default:
        if not blocks.segment.min_tokens <= n <= blocks.max_model_len:
            raise LookupError  # nothing to do: the caller renders the request as sent
    elif segment is not None:
        for i, d in enumerate(documents or ()):
            check_text(d, f"documents[{i}]", "documents", for_segmenter=True)
        blocks.check_tokens(n + sum(len(_encode(tokenizer, d)) for d in documents or ()), param)
    elif documents is None:
        raise LookupError
    # The template's tokens before the last user message (system prompt, earlier turns) stay one
    # head block, never cut: at offset 0 and causal, it is ordinary KV on vLLM's prefix chain, so a
    # growing history is reused turn after turn exactly as stock prefix caching reuses it, and
    # cutting it would reuse nothing more (docs/server.md, "Chat: the history is never cut").
    # One segmentation job for the request: every document, and the message itself (whose last
    # piece stays in the final block).
    texts = list(documents or ())
    if segment is not None and text:
        texts.append(text)
    cut = iter(await cut_texts(blocks, texts, segment, tenant))
    context: list = []
    prefix = head
    for _ in documents or ():
        context.extend(next(cut))
    final_ids = text_ids
    if segment is not None and text:
        pieces = next(cut)
        context.extend(pieces[:-1])
        if pieces[-1] != text:
            final_ids = _encode(tokenizer, pieces[-1])
    if not context:
        raise LookupError  # nothing was cut: the conversation is rendered as sent, an ordinary prompt
    final = final_ids + tail
    if not final:
        raise BlockRequestError("the final block (last user message and the template's tail) is empty", "messages")
    return _build(blocks, tokenizer, context, final, prefix)


# -- the two request flows, as the API server's renderer runs them (plugin.py installs them) -----------


def _error_response(renderer, error: BlockRequestError):
    """The error response of a request the server could not turn into a block prompt."""
    return renderer.create_error_response(str(error), err_type=error.err_type, status_code=error.status,
                                          param=error.param)


async def render_block_completion(renderer, vllm_config, request, render):
    """``OnlineRenderer.render_completion`` for an engine that runs the backend: the prompt becomes
    the block prompt of ``documents``/``segment`` (or stays as sent), then ``render(request)``, vLLM's
    own rendering, takes it from there."""
    extra = request.model_extra or {}
    try:
        ids = await completion_ids(server_blocks(vllm_config), renderer.renderer.tokenizer, request.prompt,
                                   extra.get("documents"), extra.get("segment"),
                                   add_special_tokens=getattr(request, "add_special_tokens", True),
                                   tenant=tenant_of(request))
    except BlockRequestError as e:
        return _error_response(renderer, e)
    if ids is not None:
        request.prompt = ids
    return await render(request)


async def render_block_chat(renderer, vllm_config, request, render):
    """``OnlineRenderer.render_chat`` for an engine that runs the backend: the conversation is
    rendered by the model's own template with a one-sink placeholder for the last user message's
    content (``render``, vLLM's own rendering), and the block prompt is built around it
    (:func:`chat_ids`); a request that asks for nothing, or that the server's default cannot apply
    to, is rendered as sent."""
    tokenizer = renderer.renderer.tokenizer
    by_default = False  # only the server's default asks for blocks: it never fails the request
    try:
        blocks = server_blocks(vllm_config)
        documents = parse_documents(request.documents)
        requested = parse_segment((request.model_extra or {}).get("segment"))
        if documents is None and (requested == "off" or (requested is None and blocks.segment.default == "off")):
            return await render(request)
        by_default = documents is None and requested is None
        if not by_default:
            check_messages(request.messages)
        sink_text = tokenizer.convert_ids_to_tokens(blocks.settings.marker_id)
        index = last_user_index(request.messages)
        messages, text = chat_placeholder_messages(request.messages, index, sink_text)
    except BlockRequestError as e:
        if by_default:  # no user message, or one with non-text parts: rendered as sent
            return await render(request)
        return _error_response(renderer, e)
    result = await render(request.model_copy(update={"messages": messages, "documents": None}))
    if not isinstance(result, tuple) or len(result[1]) != 1 or "prompt_token_ids" not in result[1][0]:
        if by_default:
            return await render(request)
        if not isinstance(result, tuple):
            return result  # an ErrorResponse
        return renderer.create_error_response("block chat prompts need a token prompt", param="messages")
    conversation, engine_inputs = result
    try:
        ids = await chat_ids(blocks, tokenizer, list(engine_inputs[0]["prompt_token_ids"]), text, documents,
                             requested, tenant=tenant_of(request))
    except LookupError:
        return await render(request)
    except BlockRequestError as e:
        return _error_response(renderer, e)
    # the placeholder's token offsets no longer describe the prompt: dropped
    engine_input = {k: v for k, v in engine_inputs[0].items() if k != "prompt_token_offsets"}
    engine_input["prompt_token_ids"] = ids
    engine_input["prompt"] = tokenizer.decode(ids)
    for message in conversation:
        if isinstance(message, dict) and message.get("content") == sink_text:
            message["content"] = text
    return conversation, [engine_input]
