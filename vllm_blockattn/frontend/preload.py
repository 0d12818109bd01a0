"""``POST /v1/blocks``: load documents into the block cache ahead of traffic, without generating.

Body (the ``documents`` and ``segment`` shapes of chat and completions requests)::

    {"model": "NAME", "documents": ["text", {"title": "T", "text": "..."}, ...],
     "segment": "auto" | "off" | {"threshold": ..., "depth": ...},   # optional
     "cache_salt": "tenant-a",                                         # optional
     "pin": true, "ttl_seconds": 3600}                                 # optional

Answer: ``{"object": "blocks.preload", "model", "documents", "blocks", "prompt_tokens",
"cached_tokens", "requests"}``: the documents' blocks and tokens (sink groups included), how many of
those tokens were already cached, and how many engine requests loaded them; with ``"pin": true`` also
``"pinned": {"pinned", "refreshed", "missing", "pinned_pages"}``.

``"pin": true`` keeps the documents' pages resident (never evicted) until ``POST /v1/blocks/unpin``
with the same documents (and ``segment``, ``cache_salt``, ``model``), or until ``ttl_seconds`` pass;
pinned pages are bounded by ``pin_fraction`` of the KV cache (a pin beyond it is a 400 naming ``pin``;
the documents stay loaded, unpinned). The pin itself is an engine-core utility
(``engine/pins.py``), reached only from here.

A preloaded document is keyed exactly as in any later request that carries it (``documents`` or a
client-built block prompt with the same tokens, same ``cache_salt`` and model/adapter), so it is a
block-cache hit there at any position. Documents are packed into block prompts that fit the model
(``core/preload.py``) and run one after another, each for one token that is thrown away, so a large
preload takes turns with live traffic instead of flooding the scheduler. Everything a client sends
is checked as in every request (``core/request_options.py``): a malformed field is a 400 naming it,
a document that cannot fit the model on its own is a 400 naming ``documents[i]``, and a request is
bounded (at most ``MAX_DOCUMENTS`` documents and ``PRELOAD_WINDOWS`` model windows of text). A client
that disconnects stops the remaining prompts.

The route is an endpoint plugin of vLLM (entry point group ``vllm.endpoint_plugins``, registered in
``plugin.py``); vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS``, e.g.
``VLLM_PLUGINS=blockattn vllm serve MODEL --attention-backend blockattn``.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the route's annotations in these globals

from ..core.preload import PreloadError, final_block_ids, plan_preload
from ..core.request_options import (MAX_CHARS_PER_TOKEN, BlockRequestError, check_text, parse_documents,
                                    parse_segment)
from .server import ServerBlocks, cut_texts, server_blocks

logger = logging.getLogger("vllm.blockattn")  # under vLLM's logger: its handler and level

UNPIN_KEYS = {"model", "documents", "segment", "cache_salt"}
PRELOAD_KEYS = UNPIN_KEYS | {"pin", "ttl_seconds"}
PRELOAD_WINDOWS = 16  # text of at most this many model windows per preload request


def error_body(message: str, param: str | None, status: HTTPStatus) -> dict:
    kind = {HTTPStatus.NOT_FOUND: "NotFoundError", HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
            HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError"}.get(status, "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": int(status)}}


@dataclass(frozen=True)
class PreloadBody:
    model: str | None
    documents: list[str]
    segment: Any  # SegmentOptions or None
    cache_salt: str | None
    pin: bool = False
    ttl_seconds: float | None = None


def parse_preload(body: Any, keys: set[str] = PRELOAD_KEYS) -> PreloadBody:
    """A preload (or unpin, with ``UNPIN_KEYS``) body, checked field by field; BlockRequestError
    names the field."""
    if not isinstance(body, dict):
        raise BlockRequestError(f"the body must be a JSON object, got {type(body).__name__}", None)
    unknown = set(body) - keys
    if unknown:
        raise BlockRequestError(f"unknown fields {sorted(unknown)}; this route takes {sorted(keys)}",
                                sorted(unknown)[0])
    model, salt = body.get("model"), body.get("cache_salt")
    if model is not None and not isinstance(model, str):
        raise BlockRequestError(f"`model` must be a string, got {type(model).__name__}", "model")
    if salt is not None:
        if not isinstance(salt, str) or not salt:
            raise BlockRequestError("`cache_salt` must be a non-empty string", "cache_salt")
        check_text(salt, "`cache_salt`", "cache_salt")
    if "documents" not in body:
        raise BlockRequestError("`documents` is required: the documents to load", "documents")
    documents = parse_documents(body["documents"])
    if documents is None:
        raise BlockRequestError("`documents` is empty: nothing to load", "documents")
    segment = parse_segment(body.get("segment"))
    pin, ttl = body.get("pin", False), body.get("ttl_seconds")
    if not isinstance(pin, bool):
        raise BlockRequestError(f"`pin` must be true or false, got {pin!r}", "pin")
    if ttl is not None:
        if not pin:
            raise BlockRequestError("`ttl_seconds` applies to pinned documents: send it with \"pin\": true",
                                    "ttl_seconds")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
            raise BlockRequestError(f"`ttl_seconds` must be a positive number, got {ttl!r}", "ttl_seconds")
    return PreloadBody(model, documents, None if segment == "off" else segment, salt, pin,
                       None if ttl is None else float(ttl))


class PreloadService:
    """What the routes need from the server: the engine client, whether it runs the backend, the
    served model names (adapters resolve as in vLLM's own handlers)."""

    def __init__(self, engine_client, vllm_config, serving_models, enabled: bool):
        self.engine_client, self.vllm_config, self.models, self.enabled = \
            engine_client, vllm_config, serving_models, enabled

    def _lora(self, model: str | None):
        if model is None or self.models is None or self.models.is_base_model(model):
            return None
        lora = self.models.lora_requests.get(model)
        if lora is None:
            raise BlockRequestError(f"The model `{model}` does not exist.", "model", HTTPStatus.NOT_FOUND)
        return lora

    async def _blocks(self, req: PreloadBody, blocks: ServerBlocks) -> list[list[list[int]]]:
        """Each document's blocks as token ids (cut by the server's segmenter when asked), checked
        and bounded as in every request."""
        limit = blocks.max_model_len * MAX_CHARS_PER_TOKEN * PRELOAD_WINDOWS
        total = sum(map(len, req.documents))
        if total > limit:
            raise BlockRequestError(f"`documents` hold {total} characters; one request takes at most {limit} "
                                    f"({PRELOAD_WINDOWS} windows of max_model_len={blocks.max_model_len}); send "
                                    f"the rest in further requests", "documents")
        if req.segment is not None:
            for i, d in enumerate(req.documents):
                check_text(d, f"documents[{i}]", "documents", for_segmenter=True)
                if len(d) > blocks.max_chars:
                    raise BlockRequestError(f"documents[{i}] holds {len(d)} characters; a document to segment "
                                            f"takes at most {blocks.max_chars}", "documents")
        tenant = (req.cache_salt, req.model)  # as tenant_of(request) for chat and completions
        pieces = await cut_texts(blocks, req.documents, req.segment, tenant)
        tokenizer = self.engine_client.tokenizer
        return [[tokenizer.encode(p, add_special_tokens=False) for p in ps] for ps in pieces]

    async def preload(self, body: Any) -> dict:
        self._check_enabled()
        req = parse_preload(body)
        lora = self._lora(req.model)
        blocks = server_blocks(self.vllm_config)
        encoded = await self._blocks(req, blocks)
        try:
            plan = plan_preload(encoded, blocks.settings, self.vllm_config.cache_config.block_size,
                                blocks.max_model_len, final_block_ids(self.engine_client.tokenizer, blocks.settings))
        except PreloadError as e:
            raise BlockRequestError(str(e), "documents") from None
        cached = await self._run(plan.prompts, req.cache_salt, lora)
        out = {"object": "blocks.preload", "model": req.model, "documents": len(req.documents),
               "blocks": plan.blocks, "prompt_tokens": plan.tokens, "cached_tokens": cached,
               "requests": len(plan.prompts)}
        if req.pin:
            out["pinned"] = await self._pins("pin", req, lora, [b for bs in encoded for b in bs], loaded=True)
        return out

    async def unpin(self, body: Any) -> dict:
        self._check_enabled()
        req = parse_preload(body, UNPIN_KEYS)
        lora = self._lora(req.model)
        encoded = await self._blocks(req, server_blocks(self.vllm_config))
        result = await self._pins("unpin", req, lora, [b for bs in encoded for b in bs])
        return {"object": "blocks.unpin", "model": req.model, "documents": len(req.documents), **result}

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise BlockRequestError("this server's engine does not run the blockattn backend "
                                    "(start it with --attention-backend blockattn)", None)

    async def _pins(self, op: str, req: PreloadBody, lora, blocks: list[list[int]], loaded: bool = False) -> dict:
        """The engine core's ``blockattn_pins`` utility on every engine (data parallelism: each pins
        what it holds); counts summed."""
        lora_key = None if lora is None else (lora.lora_name, lora.lora_path)
        results = await self.engine_client.engine_core.call_utility_all_async(
            "blockattn_pins", op, req.cache_salt, lora_key, blocks, req.ttl_seconds)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise BlockRequestError(errors[0] + (" (the documents were loaded, not pinned)" if loaded else ""),
                                    "pin" if op == "pin" else None)
        keys = [k for k in results[0] if k != "pinned_pages"]
        out = {k: sum(r[k] for r in results) for k in keys}
        out["pinned_pages"] = sum(r["pinned_pages"] for r in results)
        return out

    async def _run(self, prompts: list[list[int]], salt: str | None, lora) -> int:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        cached = 0
        for ids in prompts:  # one at a time: a preload takes turns with live traffic
            prompt = {"prompt_token_ids": ids}
            if salt is not None:
                prompt["cache_salt"] = salt
            final = None
            async for out in self.engine_client.generate(prompt, params, f"blockattn-preload-{uuid.uuid4().hex}",
                                                         lora_request=lora):
                final = out
            if final is not None and final.num_cached_tokens:
                cached += int(final.num_cached_tokens)
        return cached


def attach_router(app) -> None:
    """Add ``POST /v1/blocks`` to vLLM's API server app."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    from vllm.entrypoints.serve.utils.api_utils import with_cancellation

    router = APIRouter()

    async def answer(raw_request: Request, call):
        service: PreloadService | None = getattr(raw_request.app.state, "blockattn_preload", None)
        if service is None:
            return JSONResponse(error_body("block preloading is not available on this server", None,
                                           HTTPStatus.SERVICE_UNAVAILABLE), status_code=503)
        try:
            return JSONResponse(await call(service))
        except BlockRequestError as e:
            return JSONResponse(error_body(str(e), e.param, e.status), status_code=int(e.status))
        except Exception:  # noqa: BLE001 - one request fails; the server keeps serving
            logger.exception("blockattn: %s failed", raw_request.url.path)
            return JSONResponse(error_body("the request failed (see the server log)", None,
                                           HTTPStatus.INTERNAL_SERVER_ERROR), status_code=500)

    @router.post("/v1/blocks")
    @with_cancellation
    async def preload_blocks(body: dict[str, Any], raw_request: Request):
        return await answer(raw_request, lambda service: service.preload(body))

    @router.post("/v1/blocks/unpin")
    @with_cancellation
    async def unpin_blocks(body: dict[str, Any], raw_request: Request):
        return await answer(raw_request, lambda service: service.unpin(body))

    app.include_router(router)
