"""Abuse of the real server (``vllm-blockattn serve``, multi-process engine, loopback; the session's
plain server, shared with test_server.py, so every check is a delta over this module): forged
internal keys, malformed and oversized block prompts, many tiny blocks, odd
``vllm_xargs`` values, and good and bad requests interleaved under concurrency.

Every bad request must get its own 4xx naming its problem, every good one the HF reference's greedy
tokens, the server must stay up, and the block counters on ``/metrics`` must count exactly the good
block requests (a rejected request is never admitted, so never counted).

The tests run in file order and share one server; the last one checks the module's totals.
"""

import concurrent.futures as cf
import functools

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_blockattn import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.core.paged import padded_length
from vllm_blockattn.core.reference import block_generate

from tests._server import MAX_MODEL_LEN, MODEL_NAME, completion, metric_value

MAX_TOKENS = 4
PAGE = 32  # the plugin's CPU default KV page size
DOCS = [
    "Alice moved to Paris in 2019 and works as a nurse at a large hospital near the river.",
    "Bob collects stamps from 42 countries and keeps them in a wooden chest in the attic.",
    "The river flows past the old mill, where the miller keeps his books in a wooden chest.",
    "Caroline: Hey Mel! How was the concert last night? Melanie: It was great, thanks!",
]
QUESTIONS = ["Question: Where does Alice live? Answer:", "Question: How many countries? Answer:"]
PREFIX = "<|im_start|>user\nRead the documents and answer.\n"
PLAUSIBLE = [1, 0, 10, 0, 5, 10, 0]  # a well-formed encoded layout: 1 block at 0..5, final at slot 0, offset 10
COUNTERS = ("block_requests", "context_blocks", "block_cache_hits", "reused_block_tokens")


@pytest.fixture(scope="module")
def server(plain_server):
    return plain_server


@pytest.fixture(scope="module")
def hf(tiny_qwen3, one_torch_thread):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_qwen3), BlockSettings.from_pretrained(tiny_qwen3)


class Ledger:
    """The good block requests this module sent, against the server's counters at the start."""

    def __init__(self, srv, settings):
        self.srv, self.settings = srv, settings
        self.start = counters(srv)
        self.requests = self.blocks = 0

    def good(self, ids) -> None:
        layout = parse_block_prompt(ids, self.settings)
        if layout.is_block_prompt:
            self.requests += 1
            self.blocks += len(layout.context_blocks)


@pytest.fixture(scope="module", autouse=True)
def ledger(server, hf):
    """Autouse: the counters are read before the module's first request."""
    return Ledger(server, hf[2])


def counters(srv) -> dict:
    text = srv.metrics()
    return {c: metric_value(text, f"vllm_blockattn:{c}_total") for c in COUNTERS}


@pytest.fixture(scope="module")
def reference(hf):
    model, _, settings = hf

    @functools.lru_cache(maxsize=None)
    def ref(ids: tuple, max_tokens: int = MAX_TOKENS) -> list[int]:
        return block_generate(model, list(ids), parse_block_prompt(ids, settings), max_new_tokens=max_tokens)

    return lambda ids, max_tokens=MAX_TOKENS: ref(tuple(ids), max_tokens)


def block_ids(hf, docs, question=QUESTIONS[0], prefix=PREFIX):
    _, tok, settings = hf
    return build_block_prompt([*docs, question], settings, tokenizer=tok, prefix=prefix)


def plain_ids(hf, text):
    return hf[1].encode(text)


def tiny_blocks(hf, n, prefix="x"):
    """A block prompt of ``n`` one-page blocks of a couple of tokens each."""
    _, tok, settings = hf
    sinks = [settings.sink_token_id] * settings.num_sinks
    ids = tok.encode(prefix)
    for i in range(n):
        ids += sinks + tok.encode(f"d{i}")
    return ids + sinks + tok.encode(QUESTIONS[1])


def error_message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text


def post(srv, prompt, *, chat=False, max_tokens=MAX_TOKENS, **kw):
    """A completion (or chat completion of one user message); never raises for a dead server."""
    try:
        if not chat:
            return completion(srv.url, prompt, max_tokens, **kw)
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, **kw}
        return requests.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
    except requests.RequestException as e:
        pytest.fail(f"no answer ({type(e).__name__}): the server died or hung\n{srv.log_tail()}")


def assert_rejected(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text[:500])
    msg = error_message(r)
    for needle in needles:
        assert needle in msg, msg


def assert_answer(r, ref):
    assert r.status_code == 200, r.text[:500]
    assert r.json()["choices"][0]["token_ids"] == ref


def assert_alive(srv):
    assert srv.alive(), f"the server is down:\n{srv.log_tail()}"


# -- forged internal keys ------------------------------------------------------------------------------

FORGED = {
    "the [5] case": ("plain", {"_blockattn_layout": [5]}),
    "plausible list, ordinary prompt": ("plain", {"_blockattn_layout": PLAUSIBLE}),
    "plausible list, block prompt": ("block", {"_blockattn_layout": PLAUSIBLE}),
    "string value": ("plain", {"_blockattn_layout": "abc"}),
    "negative values": ("plain", {"_blockattn_layout": [-1, -2, -3]}),
    "non-integer values": ("block", {"_blockattn_layout": [1.5, "x", 2.5]}),
    "huge final offset": ("plain", {"_blockattn_layout": [0, 0, 10**9]}),
    "bare prefix name": ("plain", {"_blockattn": 1}),
    "another layout name": ("block", {"_blockattn_paged_layout": [0, 0, 0]}),
    "prefix-only match": ("plain", {"_blockattnx": "y"}),
    "alongside a legit key": ("block", {"temperature_hint": 1, "_blockattn_layout": [0, 0, 0]}),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_internal_key_is_rejected(server, hf, case):
    kind, xargs = FORGED[case]
    prompt = plain_ids(hf, DOCS[0] + QUESTIONS[0]) if kind == "plain" else block_ids(hf, DOCS[:2])
    assert_rejected(post(server, prompt, vllm_xargs=xargs), 400, "reserved")
    assert_alive(server)


def test_forged_internal_key_in_chat_is_rejected(server):
    r = post(server, "Hello there", chat=True, vllm_xargs={"_blockattn_layout": [5]})
    assert_rejected(r, 400, "reserved")
    assert_alive(server)


def test_forged_key_with_a_dict_value_is_a_validation_error(server, hf):
    # vLLM's request schema takes str/int/float/list values only: a 400 from the schema, naming the field.
    r = post(server, plain_ids(hf, DOCS[0]), vllm_xargs={"_blockattn_layout": {"blocks": [0, 5]}})
    assert_rejected(r, 400, "vllm_xargs", "_blockattn_layout")
    assert_alive(server)


def test_forged_layout_cannot_poison_the_prefix_cache(server, hf, reference, ledger):
    # A uniform position shift leaves a RoPE model's own answer unchanged but writes shifted keys into
    # pages that later honest requests with the same prefix reuse. The forged request must never run.
    plain = plain_ids(hf, "Note 7741. " + DOCS[1] * 3 + QUESTIONS[1])
    assert len(plain) >= 3 * PAGE
    block = block_ids(hf, ["Note 7741. " + DOCS[2] * 2, DOCS[3]])
    for ids in (plain, block):
        assert_rejected(post(server, ids, vllm_xargs={"_blockattn_layout": [0, 0, 500]}), 400, "reserved")
        for _ in range(2):  # cold, then from the cache
            assert_answer(post(server, ids), reference(ids))
            ledger.good(ids)


# -- malformed and oversized block prompts -------------------------------------------------------------


def malformed(hf):
    _, tok, settings = hf
    s = settings.sink_token_id
    text = tok.encode(DOCS[0])
    return {
        "sink run of 3": (text + [s] * 3 + text, "sink run of length 3"),
        "sink run of 5": (text + [s] * 5 + text, "sink run of length 5"),
        "two groups back to back": (text + [s] * 8 + text, "sink run of length 8"),
        "single stray sink": (text + [s] + text, "sink run of length 1"),
        "group ends the prompt": (text + [s] * 4, "ends the prompt"),
        "only a sink group": ([s] * 4, "ends the prompt"),
        "good blocks, then a group at the end": (block_ids(hf, DOCS[:2]) + [s] * 4, "ends the prompt"),
    }


@pytest.mark.parametrize("case", ["sink run of 3", "sink run of 5", "two groups back to back", "single stray sink",
                                  "group ends the prompt", "only a sink group",
                                  "good blocks, then a group at the end"])
def test_malformed_block_prompt_gets_400_naming_the_problem(server, hf, case):
    ids, needle = malformed(hf)[case]
    assert_rejected(post(server, ids), 400, "invalid block prompt", needle)


def test_malformed_block_prompt_as_text_and_in_chat(server):
    bad = "Some text" + "<|block_sink|>" * 3 + "more text"
    assert_rejected(post(server, bad), 400, "sink run of length 3")
    assert_rejected(post(server, bad, chat=True), 400, "sink run of length 3")
    assert_rejected(post(server, "Some text" + "<|block_sink|>" * 4, chat=False), 400, "ends the prompt")


def test_block_prompt_too_long_once_padded_gets_400(server, hf):
    for n in (70, 100, 250):  # 250 tiny blocks: ~1900 tokens as sent, ~8000 once padded
        ids = tiny_blocks(hf, n)
        assert len(ids) < MAX_MODEL_LEN < padded_length(parse_block_prompt(ids, hf[2]), PAGE)
        assert_rejected(post(server, ids), 400, "padded to KV pages", f"max_model_len={MAX_MODEL_LEN}")
    assert_alive(server)


def test_prompt_too_long_before_padding_gets_vllms_own_400(server, hf):
    ids = tiny_blocks(hf, 1000)  # ~7800 tokens
    assert len(ids) > MAX_MODEL_LEN
    r = post(server, ids)
    assert 400 <= r.status_code < 500, r.text[:500]
    assert "context length" in error_message(r) or "maximum" in error_message(r), error_message(r)


def test_many_tiny_blocks_that_fit_are_answered_right(server, hf, reference, ledger):
    ids = tiny_blocks(hf, 60)
    assert padded_length(parse_block_prompt(ids, hf[2]), PAGE) < MAX_MODEL_LEN
    for _ in range(2):
        assert_answer(post(server, ids), reference(ids))
        ledger.good(ids)


def test_padded_prompt_at_the_limit_keeps_answers_right(server, hf, reference, ledger):
    # Fits once padded, but leaves room for only a few of the tokens asked for: either refused, or
    # the reference's first tokens with finish_reason "length" (the padded length counts against
    # max_model_len).
    ids = tiny_blocks(hf, 62)
    filler = hf[1].encode(" a")[-1:]
    while padded_length(parse_block_prompt(ids, hf[2]), PAGE) < MAX_MODEL_LEN - 4:
        ids = ids + filler  # the final block grows one token at a time
    room = MAX_MODEL_LEN - padded_length(parse_block_prompt(ids, hf[2]), PAGE)
    assert 0 < room <= 4
    r = post(server, ids, max_tokens=16)
    if r.status_code == 400:
        assert "padded" in error_message(r) or "max_model_len" in error_message(r), error_message(r)
    else:
        assert r.status_code == 200, r.text[:500]
        choice = r.json()["choices"][0]
        got = choice["token_ids"]
        assert 0 < len(got) <= 16 and got == reference(ids, 16)[: len(got)]
        if len(got) < 16:
            assert choice["finish_reason"] == "length"
        ledger.good(ids)
    assert_alive(server)


# -- odd values under keys that are not reserved -------------------------------------------------------


def test_unreserved_xargs_with_odd_values_are_ignored(server, hf, reference, ledger):
    ids = block_ids(hf, [DOCS[3], DOCS[0]], question=QUESTIONS[1])
    for xargs in ({"note": -5}, {"weight": 2.5, "tags": ["a", -1, 0.25]}, {"blockattn_layout": [5]},
                  {"layout": [1, 0, 10, 0, 5, 10, 0]}):
        assert_answer(post(server, ids, vllm_xargs=xargs), reference(ids))
        ledger.good(ids)


# -- good and bad requests at once ---------------------------------------------------------------------


def test_concurrent_good_and_bad_requests(server, hf, reference, ledger):
    s = hf[2].sink_token_id
    goods = []
    for i, order in enumerate([[0, 1, 2], [2, 0, 1], [1, 3], [3, 2, 1, 0], [0, 1, 2], [1, 3]]):
        goods.append(block_ids(hf, [DOCS[j] for j in order], question=QUESTIONS[i % 2]))
    goods.append(tiny_blocks(hf, 20))
    goods += [plain_ids(hf, DOCS[i] + QUESTIONS[i % 2]) for i in range(3)]
    bads = [
        (dict(prompt=plain_ids(hf, DOCS[0]), vllm_xargs={"_blockattn_layout": [5]}), 400, "reserved"),
        (dict(prompt=goods[0], vllm_xargs={"_blockattn_layout": PLAUSIBLE}), 400, "reserved"),
        (dict(prompt=plain_ids(hf, DOCS[1]), vllm_xargs={"_blockattn_x": [-1, 2.5]}), 400, "reserved"),
        (dict(prompt=plain_ids(hf, DOCS[2]), vllm_xargs={"_blockattn_layout": {"a": 1}}), 400, "vllm_xargs"),
        (dict(prompt=plain_ids(hf, DOCS[3]) + [s] * 3 + [5]), 400, "sink run of length 3"),
        (dict(prompt=goods[1] + [s] * 4), 400, "ends the prompt"),
        (dict(prompt=tiny_blocks(hf, 80)), 400, "padded to KV pages"),
        (dict(prompt="Hi", chat=True, vllm_xargs={"_blockattn_layout": PLAUSIBLE}), 400, "reserved"),
    ]
    refs = {tuple(g): reference(g) for g in goods}
    jobs = []  # interleaved, each kind several times
    for k in range(3 * max(len(goods), len(bads))):
        jobs.append(("good", goods[k % len(goods)]))
        jobs.append(("bad", bads[k % len(bads)]))

    def send(job):
        kind, what = job
        if kind == "good":
            return post(server, what)
        kw = dict(what[0])
        return post(server, kw.pop("prompt"), **kw)

    before = counters(server)
    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(send, jobs))
    after = counters(server)

    for (kind, what), r in zip(jobs, results):
        if kind == "good":
            assert_answer(r, refs[tuple(what)])
            ledger.good(what)
        else:
            assert_rejected(r, what[1], what[2])
    good_block = [what for kind, what in jobs if kind == "good" and parse_block_prompt(what, hf[2]).is_block_prompt]
    delta = {c: after[c] - before[c] for c in COUNTERS}
    assert delta["block_requests"] == len(good_block), delta
    assert delta["context_blocks"] == sum(len(parse_block_prompt(g, hf[2]).context_blocks) for g in good_block)
    assert 0 < delta["block_cache_hits"] <= delta["context_blocks"], delta  # repeats hit
    assert delta["reused_block_tokens"] > 0
    assert_alive(server)


# -- last: the server is up and its counters add up ----------------------------------------------------


def test_server_stays_up_and_counters_count_only_good_block_requests(server, ledger):
    assert_alive(server)
    assert requests.get(server.url + "/v1/models", timeout=30).status_code == 200
    now = counters(server)
    delta = {c: now[c] - ledger.start[c] for c in COUNTERS}
    assert ledger.requests > 0
    assert delta["block_requests"] == ledger.requests, (delta, ledger.requests)
    assert delta["context_blocks"] == ledger.blocks, (delta, ledger.blocks)
    assert 0 <= delta["block_cache_hits"] <= delta["context_blocks"]
    assert delta["reused_block_tokens"] >= delta["block_cache_hits"]
