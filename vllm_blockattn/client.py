"""Build block-attention requests for an OpenAI-compatible vLLM server.

The block layout survives any path that carries text, because ``<|block_sink|>`` is a special token:
a completion prompt or a chat message whose text holds sink groups is parsed by the server exactly as
the token-id form. Example::

    from openai import OpenAI
    from vllm_blockattn.client import block_completion_request

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    req = block_completion_request(model, ["doc one ...", "doc two ..."], "Question: ...? Answer:")
    print(client.completions.create(**req).choices[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence

from .core.layout import DEFAULT_NUM_SINKS, SINK_TOKEN, build_block_text


def block_prompt_text(documents: Sequence[str], question: str, *, prefix: str = "", sink_token: str = SINK_TOKEN,
                      num_sinks: int = DEFAULT_NUM_SINKS) -> str:
    """``prefix [S x k] doc_1 ... [S x k] question`` as text; the question is the final block. For a
    checkpoint trained without sinks pass ``sink_token="<|block_boundary|>", num_sinks=0`` (one boundary
    token per block)."""
    return prefix + build_block_text([*documents, question], sink_token, num_sinks)


def block_completion_request(model: str, documents: Sequence[str], question: str, **params) -> dict:
    """Keyword arguments for ``client.completions.create`` (``/v1/completions``)."""
    return {"model": model, "prompt": block_prompt_text(documents, question), **params}


def block_chat_request(model: str, documents: Sequence[str], question: str, *, system: str | None = None,
                       **params) -> dict:
    """Keyword arguments for ``client.chat.completions.create`` (``/v1/chat/completions``).

    The documents and the question go into the user message as blocks; the chat template's own
    tokens before the first sink group form a block of their own, and everything after the last sink
    group (the question, the assistant header and the answer) is the final block.
    """
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": build_block_text([*documents, question])})
    return {"model": model, "messages": messages, **params}
