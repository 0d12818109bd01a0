"""Preloading documents into the block cache: which prompts to run (no vLLM).

A context block's KV depends on its own tokens alone, so running any block prompt that holds a
document as a context block leaves that document's pages in the cache, keyed exactly as in every
later request that carries it (at any position, next to any other documents). Preloading is
therefore a plan of ordinary block prompts: the documents' blocks packed greedily into prompts that
fit the model's window once padded to KV pages, each closed by a one-token final block, run for one
generated token that nobody reads. The API server's ``POST /v1/blocks`` (``frontend/preload.py``) and
the offline helper ``vllm_blockattn.preload_documents`` both run this plan, so both load the same
pages as a request with ``documents``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .layout import BlockSettings, build_block_prompt, page_padding


class PreloadError(ValueError):
    """A document that cannot be preloaded; ``index`` is its position in the request's documents."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def final_block_ids(tokenizer, settings: BlockSettings) -> list[int]:
    """The one-token final block closing every preload prompt (a newline, else EOS)."""
    ids = [t for t in tokenizer.encode("\n", add_special_tokens=False) if t != settings.marker_id][:1]
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = [tokenizer.eos_token_id]
    return ids


@dataclass(frozen=True)
class PreloadPlan:
    prompts: list[list[int]]  # block prompts to run, one generated token each
    blocks: int  # context blocks loaded (a document cut by the segmenter gives several)
    tokens: int  # the documents' tokens, sink groups included (what the block cache will hold)


def plan_preload(documents: Sequence[Sequence[Sequence[int]]], settings: BlockSettings, page_size: int,
                 max_model_len: int, final_ids: Sequence[int]) -> PreloadPlan:
    """Pack the blocks of ``documents`` (each a list of blocks, each block token ids without sinks)
    into block prompts of at most ``max_model_len - 1`` tokens once padded to pages (the engine's own
    admission rule), in order, each ending with the final block ``final_ids``.

    Raises PreloadError naming the document whose block cannot fit a prompt on its own, or that holds
    the sink token."""
    if not final_ids:
        raise PreloadError("the final block of a preload prompt needs a token")
    final_len = settings.num_sinks + len(final_ids)
    budget = max_model_len - 1 - final_len  # padded context tokens one prompt may carry
    prompts: list[list[int]] = []
    group: list[Sequence[int]] = []
    used = blocks = tokens = 0
    for d, pieces in enumerate(documents):
        for block in pieces:
            if settings.marker_id in block:
                raise PreloadError(f"documents[{d}] holds the block {settings.marker_name} (id {settings.marker_id}); "
                                   f"documents are text, the server marks the blocks", d)
            n = settings.num_sinks + len(block)  # attended tokens: a sink-free boundary is dropped
            padded = n + page_padding(n, page_size)
            if padded > budget:
                raise PreloadError(f"documents[{d}] is a block of {n} tokens ({padded} padded to KV pages of "
                                   f"{page_size}), which cannot fit a prompt within max_model_len={max_model_len} "
                                   f"with its final block; send it with \"segment\" to cut it, or split it", d)
            if used + padded > budget:
                prompts.append(build_block_prompt([*group, final_ids], settings))
                group, used = [], 0
            group.append(block)
            used += padded
            blocks += 1
            tokens += n
    if group:
        prompts.append(build_block_prompt([*group, final_ids], settings))
    return PreloadPlan(prompts, blocks, tokens)
