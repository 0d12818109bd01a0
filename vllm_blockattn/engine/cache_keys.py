"""The block cache's keys, in one place: what a page of a block request is hashed by.

The argument that a key determines the page's KV (docs/plugin.md, "Cache keys"):

- **Namespace** (:func:`request_namespace`): model, sink settings and "blockattn" (from the engine's
  config), the request's ``cache_salt`` and its LoRA adapter. A block page never meets another tenant's
  or another adapter's page, nor full-attention KV (whose keys carry no namespace).
- **A context block** (:func:`block_chain`): full pages chain from a fresh root over the block's own
  tokens (causal attention inside the block, block-local positions: a full page's KV depends on the
  block's tokens up to its end and nothing else), so the same document hits at any offset, in any
  order, in any prompt, and a block that grew reuses every full page it had. A partially padded last
  page adds the block's real length (pads are not content). The *head* (tokens before the first sink
  group, at offset 0, attending causally from position 0) is ordinary KV: its full pages take vLLM's
  own prefix hashes of the prompt and are shared with plain prompts both ways; its padded last page is
  keyed in the namespace.
- **The final block** (:func:`make_hasher`): its chain starts from a hash of the *logical* sequence of
  (block hash, real length, offset) and of its own offset, since its KV depends on every block and
  where each one logically sits; generated tokens extend that chain.
"""

from __future__ import annotations

from vllm.v1.core.kv_cache_utils import hash_block_tokens

from ..core.layout import page_padding


def namespace_keys(engine_namespace: tuple, cache_salt: str | None, lora: tuple[str, str] | None) -> tuple:
    """Extra keys of every block-mode page: the engine's namespace, the tenant's ``cache_salt`` and the
    LoRA adapter's (name, path) (KV computed under one adapter never serves another)."""
    keys = engine_namespace + ((("cache_salt", cache_salt),) if cache_salt else ())
    if lora is not None:
        keys += (("lora", *lora),)
    return keys


def request_namespace(engine_namespace: tuple, request) -> tuple:
    """:func:`namespace_keys` of a scheduler ``Request``."""
    lora = request.lora_request
    return namespace_keys(engine_namespace, request.cache_salt,
                          None if lora is None else (lora.lora_name, lora.lora_path))


def block_chain(hash_fn, page: int, pad_id: int, toks: list[int], keys: tuple, plain_chain: list | None = None) -> list:
    """Page hashes of one context block (its real tokens ``toks``), the padded last page included.

    Full pages chain from a fresh root over the block's tokens with the namespace ``keys``: a full
    page's KV depends on the block's tokens up to its end (causal attention inside the block,
    block-local positions), which the chain covers, and on nothing else. The partially padded last
    page adds the real length, so that pads never pass for content. ``plain_chain``, for the head:
    vLLM's ordinary prefix hashes of the prompt, whose first pages are the head's full pages; the
    padded last page then chains from them, still under the namespace.
    """
    n = len(toks)
    full = n // page
    if plain_chain is not None and len(plain_chain) >= full:
        chain = plain_chain[:full]
    else:
        chain, parent = [], None
        for p in range(full):
            parent = hash_block_tokens(hash_fn, parent, toks[p * page : (p + 1) * page], keys)
            chain.append(parent)
    if n % page:
        last = toks[full * page :] + [pad_id] * page_padding(n, page)
        chain.append(hash_block_tokens(hash_fn, chain[-1] if chain else None, last,
                                       keys + (("block_tokens", n),)))
    return chain


def leading_hits(pool, chain: list, group_ids: list[int]) -> int:
    """How many leading pages of ``chain`` the block pool holds."""
    n = 0
    for h in chain:
        if pool.get_cached_block(h, group_ids) is None:
            break
        n += 1
    return n


def make_hasher(hash_fn, page, keys, layout, block_hashes, paged):
    """The request's block hasher: precomputed per-block chains for the context pages, then a chain
    over the final block (and generated tokens) rooted at the logical block sequence."""
    offsets = layout.offsets()
    logical_of = {o: b for b, o in enumerate(offsets[:-1])}  # offsets are distinct: blocks are non-empty
    context_pages = [h for o in paged.offsets for h in block_hashes[logical_of[o]]]  # physical order
    logical = tuple((bh[-1], blk.num_tokens, o) for bh, blk, o in zip(block_hashes, layout.context_blocks, offsets))
    root = hash_block_tokens(hash_fn, None, (), keys + (("blocks", logical), ("final_offset", offsets[-1])))
    n_ctx = len(context_pages)

    def hasher(request) -> list:
        have = len(request.block_hashes)
        out: list = []
        for p in range(have, request.num_tokens // page):
            if p < n_ctx:
                out.append(context_pages[p])
                continue
            prev = root if p == n_ctx else (out[-1] if out else request.block_hashes[p - 1])
            out.append(hash_block_tokens(hash_fn, prev, request.all_token_ids[p * page : (p + 1) * page], keys))
        return out

    return hasher
