"""The OpenAI-compatible server with the blockattn backend (multi-process engine, loopback only)."""

import concurrent.futures as cf
import functools

import pytest
import requests

from vllm_blockattn import parse_block_prompt
from vllm_blockattn.client import block_chat_request, block_completion_request, block_prompt_text
from vllm_blockattn.core.reference import block_generate

from tests._reference import load_hf
from tests._server import completion, metric_value

DOCS = [
    "Alice moved to Paris in 2019 and works as a nurse at a large hospital near the river.",
    "Bob collects stamps from 42 countries and keeps them in a wooden chest in the attic.",
    "The river flows past the old mill, where the miller keeps his books in a wooden chest.",
    "Caroline: Hey Mel! How was the concert last night? Melanie: It was great, thanks!",
]
QUESTION = "Question: Where does Alice live? Answer:"
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def server(plain_server):
    return plain_server.url


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return load_hf(tiny_qwen3)


def reference_tokens(hf, ids):
    model, _, settings = hf
    return block_generate(model, ids, parse_block_prompt(ids, settings), max_new_tokens=MAX_TOKENS)


def complete(base, prompt, **kw):
    return completion(base, prompt, MAX_TOKENS, **kw)


def test_completion_with_block_text_matches_reference(server, hf):
    _, tok, _ = hf
    req = block_completion_request("tiny", DOCS[:3], QUESTION, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                   return_token_ids=True)
    r = requests.post(server + "/v1/completions", json=req, timeout=120)
    assert r.status_code == 200, r.text
    ids = tok.encode(req["prompt"])
    assert len(parse_block_prompt(ids, hf[2]).blocks) == 4
    choice = r.json()["choices"][0]
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == reference_tokens(hf, ids)


def test_chat_completion_with_block_text(server, hf):
    _, tok, _ = hf
    req = block_chat_request("tiny", DOCS[1:3], QUESTION, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                             return_token_ids=True)
    r = requests.post(server + "/v1/chat/completions", json=req, timeout=120)
    assert r.status_code == 200, r.text
    ids = tok.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
    layout = parse_block_prompt(ids, hf[2])
    assert layout.is_block_prompt and len(layout.blocks) == 4  # template head, 2 documents, final
    choice = r.json()["choices"][0]
    assert r.json()["prompt_token_ids"] == ids
    assert choice["token_ids"] == reference_tokens(hf, ids)


def test_malformed_request_gets_400_and_server_keeps_serving(server):
    bad = "Some text" + "<|block_sink|>" * 3 + "more text"
    r = complete(server, bad)
    assert r.status_code == 400
    assert "sink run of length 3" in r.text
    ok = complete(server, block_prompt_text(DOCS[:2], QUESTION))
    assert ok.status_code == 200


def test_block_cache_metrics_on_prometheus(server):
    prompt = block_prompt_text(DOCS[2:], "Question: What does Bob keep? Answer:")
    for _ in range(2):
        assert complete(server, prompt).status_code == 200
    text = requests.get(server + "/metrics", timeout=30).text
    value = functools.partial(metric_value, text)
    assert value("vllm_blockattn:context_blocks_total") >= 4
    assert value("vllm_blockattn:block_cache_hits_total") >= 2
    assert value("vllm_blockattn:reused_block_tokens_total") > 0


def test_concurrent_load_answers_equal_single_runs(server):
    orders = [[0, 1, 2], [2, 0, 1], [1, 3, 0], [3, 2, 1], [0, 3], [2, 1, 3, 0], [1, 0], [3, 0, 2]]
    questions = ["Question: Where does Alice live? Answer:", "Question: How many countries? Answer:"]
    prompts = [block_prompt_text([DOCS[i] for i in o], q) for o in orders for q in questions]
    alone = {}
    for p in prompts:
        r = complete(server, p)
        assert r.status_code == 200, r.text
        alone[p] = r.json()["choices"][0]["token_ids"]
    load = [prompts[i % len(prompts)] for i in range(64)]
    with cf.ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda p: complete(server, p), load))
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200][:2]
    assert [r.json()["choices"][0]["token_ids"] for r in results] == [alone[p] for p in load]
