"""``POST /v1/blocks`` (document preload) against the real server, and the offline planner.

The shared server (``conftest.segment_server``) runs with ``VLLM_PLUGINS=blockattn``, which makes vLLM
load the plugin's endpoint plugin; the plain server runs without it, so the route is absent there.
Every document here is unique to this module, so other modules' traffic cannot have cached it.
"""

import pytest
import requests
from openai import OpenAI

from vllm_blockattn import build_block_prompt
from vllm_blockattn.core.layout import BlockSettings, page_padding, parse_block_prompt
from vllm_blockattn.core.preload import PreloadError, plan_preload

from tests._reference import load_hf
from tests._server import MODEL_NAME

DOCS = [
    "Preload one: the lighthouse keeper on Skerry Island logs every passing ship in a green ledger.",
    "Preload two: the orchard behind the school has forty pear trees and one stubborn walnut tree.",
    "Preload three: the night train to Vigo stops twice, once at Ourense and once at a nameless halt.",
    "Preload four: the choir rehearses on Thursdays in the crypt, where the echo lasts three seconds.",
]
QUESTION = "Question: Who logs the ships? Answer:"
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def server(segment_server):
    return segment_server


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return load_hf(tiny_qwen3)


def preload(server, **body):
    return requests.post(server.url + "/v1/blocks", json=body, timeout=300)


def doc_tokens(hf, doc) -> int:
    """A document's tokens as a context block: its sink group and its text."""
    _, tok, settings = hf
    return settings.num_sinks + len(tok.encode(doc, add_special_tokens=False))


def complete(client, prompt, **extra_body):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True, **extra_body})


def test_preloaded_documents_hit_at_another_offset_and_match_the_reference(server, client, hf):
    from vllm_blockattn.core.reference import block_generate

    first = preload(server, model=MODEL_NAME, documents=DOCS[:2])
    assert first.status_code == 200, first.text
    summary = first.json()
    want_tokens = doc_tokens(hf, DOCS[0]) + doc_tokens(hf, DOCS[1])
    assert summary["object"] == "blocks.preload"
    assert (summary["documents"], summary["blocks"], summary["requests"]) == (2, 2, 1)
    assert summary["prompt_tokens"] == want_tokens and summary["cached_tokens"] == 0
    again = preload(server, model=MODEL_NAME, documents=DOCS[:2]).json()
    assert again["cached_tokens"] == want_tokens  # everything was already loaded
    # A later request with a new document first: the preloaded ones sit at other offsets, in another order.
    out = complete(client, QUESTION, documents=[DOCS[2], DOCS[1], DOCS[0]])
    assert out.usage.prompt_tokens_details.cached_tokens >= want_tokens
    model, tok, settings = hf
    ids = build_block_prompt([DOCS[2], DOCS[1], DOCS[0], QUESTION], settings, tokenizer=tok)
    assert out.choices[0].prompt_token_ids == ids
    want = block_generate(model, ids, parse_block_prompt(ids, settings), max_new_tokens=MAX_TOKENS)
    assert out.choices[0].token_ids == want


def test_preload_is_per_tenant(server, client, hf):
    assert preload(server, documents=[DOCS[3]], cache_salt="tenant-a").status_code == 200
    other = complete(client, QUESTION, documents=[DOCS[3]])  # no salt: another tenant
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    same = complete(client, QUESTION, documents=[DOCS[3]], cache_salt="tenant-a")
    assert same.usage.prompt_tokens_details.cached_tokens >= doc_tokens(hf, DOCS[3])


@pytest.mark.parametrize("body,param,words", [
    ({"model": MODEL_NAME}, "documents", "required"),
    ({"documents": "one text"}, "documents", "must be a list"),
    ({"documents": []}, "documents", "empty"),
    ({"documents": [{"text": "x", "page": 3}]}, "documents", "unknown keys"),
    ({"documents": ["a <|block_sink|> b"]}, "documents", "sink"),
    ({"documents": ["word " * 3000]}, "documents", "cannot fit"),
    ({"documents": ["x"], "pin": True}, "pin", "unknown fields"),
    ({"documents": ["x"], "cache_salt": 7}, "cache_salt", "non-empty string"),
    ({"documents": ["x"], "segment": {"depth": 99}}, "segment", "levels"),
])
def test_bad_preload_input_gets_a_400_naming_the_field(server, body, param, words):
    r = preload(server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert server.alive()


def test_unknown_model_is_a_404(server):
    r = preload(server, model="no-such-model", documents=["x"])
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert server.alive()


def test_route_absent_unless_the_endpoint_plugin_is_allowed(plain_server):
    # vLLM loads endpoint plugins only when VLLM_PLUGINS names them; the plain server does not
    assert requests.post(plain_server.url + "/v1/blocks", json={"documents": ["x"]}, timeout=60).status_code == 404


def test_cli_streams_a_corpus_with_a_summary(server, tmp_path, capsys):
    import json

    from vllm_blockattn.preload import main

    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps(f"CLI corpus document {i}: the ferry leaves pier {i} at {i} o'clock.") for i in range(6)]
    lines.insert(2, "")  # blank lines are skipped
    lines.append(json.dumps({"title": "Bad", "text": "has a <|block_sink|> inside"}))
    corpus.write_text("\n".join(lines) + "\n")
    status = main([str(corpus), "--url", server.url, "--model", MODEL_NAME, "--batch-size", "2", "--no-progress"])
    out, err = capsys.readouterr()
    assert status == 1  # the last batch (one bad document) was refused; the others loaded
    assert "preloaded 6 documents (6 blocks" in out and "0 already cached" in out
    assert "lines 8-8: HTTP 400" in err and "sink" in err


# -- the planner (no server) ----------------------------------------------------------------------------

SETTINGS = BlockSettings(sink_token_id=99, num_sinks=2)


def test_plan_packs_blocks_into_prompts_that_fit_the_window():
    docs = [[[1] * 10], [[2] * 30, [3] * 5], [[4] * 20]]
    plan = plan_preload(docs, SETTINGS, page_size=16, max_model_len=64, final_ids=[7])
    assert (plan.blocks, plan.tokens) == (4, 12 + 32 + 7 + 22)
    for ids in plan.prompts:
        layout = parse_block_prompt(ids, SETTINGS)
        padded = sum(b.num_tokens + page_padding(b.num_tokens, 16) for b in layout.context_blocks)
        assert padded + layout.final.num_tokens < 64 and ids[-1] == 7
    blocks = [ids[b.content_start:b.end] for ids in plan.prompts
              for b in parse_block_prompt(ids, SETTINGS).context_blocks]
    assert blocks == [[1] * 10, [2] * 30, [3] * 5, [4] * 20]  # every block once, in order


def test_plan_refuses_a_block_that_cannot_fit_alone_naming_the_document():
    with pytest.raises(PreloadError, match=r"documents\[1\]") as e:
        plan_preload([[[1] * 4], [[2] * 70]], SETTINGS, page_size=16, max_model_len=64, final_ids=[7])
    assert e.value.index == 1
    with pytest.raises(PreloadError, match="sink"):
        plan_preload([[[1, 99, 1]]], SETTINGS, page_size=16, max_model_len=64, final_ids=[7])
