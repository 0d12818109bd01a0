"""``POST /v1/blocks`` (document preload) against the real server, and the offline planner.

The shared server (``conftest.segment_server``) runs with ``VLLM_PLUGINS=blockattn``, which makes vLLM
load the plugin's endpoint plugin; the plain server runs without it, so the route is absent there.
Every document here is unique to this module, so other modules' traffic cannot have cached it.
"""

import json

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
    ({"documents": ["x"], "priority": 1}, "priority", "unknown fields"),
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


# -- pinning ------------------------------------------------------------------------------------------

SMALL_PAGES = 72  # KV pages of 32 tokens: 2304 tokens, so a flood of documents evicts


@pytest.fixture(scope="module")
def small_server(tiny_qwen3, tmp_path_factory):
    from tests._server import serve

    with serve(tiny_qwen3, tmp_path_factory.mktemp("pin-server"), "--num-gpu-blocks-override", str(SMALL_PAGES),
               "--enable-prompt-tokens-details", "--additional-config",
               json.dumps({"blockattn": {"pin_tenant_fraction": 0.5}}), env={"VLLM_PLUGINS": "blockattn"}) as srv:
        yield srv


def flood(server, n=48, tag="flood"):
    docs = [f"{tag} {i}: " + " ".join(f"{tag}-word-{i}-{j}" for j in range(40)) for i in range(n)]
    for k in range(0, n, 8):
        assert preload(server, documents=docs[k:k + 8]).status_code == 200


def test_pinned_documents_survive_a_flood_that_evicts_unpinned_ones(small_server, hf):
    from tests._server import metric_value

    client = OpenAI(base_url=small_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    pinned, unpinned = DOCS[0], DOCS[1]
    r = preload(small_server, documents=[pinned], pin=True)
    assert r.status_code == 200, r.text
    assert r.json()["pinned"]["pinned"] == 1 and r.json()["pinned"]["pinned_pages"] > 0
    assert preload(small_server, documents=[unpinned]).status_code == 200
    assert metric_value(small_server.metrics(), "vllm_blockattn:pinned_pages") > 0
    flood(small_server)
    kept = complete(client, QUESTION, documents=[pinned])
    assert kept.usage.prompt_tokens_details.cached_tokens >= doc_tokens(hf, pinned)
    gone = complete(client, QUESTION, documents=[unpinned])
    assert gone.usage.prompt_tokens_details.cached_tokens == 0  # evicted by the flood
    assert metric_value(small_server.metrics(), "vllm_blockattn:pinned_block_hits_total") >= 1
    # unpinned, the document is an ordinary cached page again: the next flood evicts it
    u = requests.post(small_server.url + "/v1/blocks/unpin", json={"documents": [pinned]}, timeout=60)
    assert u.status_code == 200 and u.json()["unpinned"] == 1 and u.json()["pinned_pages"] == 0
    assert metric_value(small_server.metrics(), "vllm_blockattn:pinned_pages") == 0
    flood(small_server, tag="again")
    assert complete(client, QUESTION, documents=[pinned]).usage.prompt_tokens_details.cached_tokens == 0


def test_pins_beyond_the_bound_are_refused_and_nothing_is_pinned(small_server):
    many = [f"bound {i}: " + " ".join(f"bound-word-{i}-{j}" for j in range(60)) for i in range(12)]
    r = preload(small_server, documents=many, pin=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "pin"
    assert "over the bound" in r.json()["error"]["message"] and "not pinned" in r.json()["error"]["message"]
    u = requests.post(small_server.url + "/v1/blocks/unpin", json={"documents": many}, timeout=60)
    assert u.status_code == 200 and u.json()["unpinned"] == 0  # all or nothing: none was pinned
    assert small_server.alive()


def test_one_tenant_cannot_pin_more_than_its_share(small_server):
    """pin_tenant_fraction 0.5: a tenant (cache_salt) that would hold more than half of the pinnable pages
    is refused (400 naming `pin`, nothing pinned), and another tenant still pins."""
    docs = [f"share {i}: " + " ".join(f"share-word-{i}-{j}" for j in range(24)) for i in range(3)]
    one = preload(small_server, documents=docs[:1], pin=True, cache_salt="tenant-a")
    assert one.status_code == 200, one.text
    share = SMALL_PAGES // 2 // 2  # pin_fraction 0.5 of the pages, then the tenant's half of those
    pages = one.json()["pinned"]["pinned_pages"]
    assert pages <= share < 3 * pages  # one document fits the share, three do not
    r = preload(small_server, documents=docs[1:], pin=True, cache_salt="tenant-a")
    assert r.status_code == 400 and r.json()["error"]["param"] == "pin"
    assert "over its share" in r.json()["error"]["message"], r.text
    other = preload(small_server, documents=docs[1:2], pin=True, cache_salt="tenant-b")
    assert other.status_code == 200 and other.json()["pinned"]["pinned"] == 1, other.text
    for salt, ds in (("tenant-a", docs[:1]), ("tenant-b", docs[1:2])):
        u = requests.post(small_server.url + "/v1/blocks/unpin", json={"documents": ds, "cache_salt": salt}, timeout=60)
        assert u.status_code == 200 and u.json()["unpinned"] == 1
    assert small_server.alive()


@pytest.mark.parametrize("body,param", [
    ({"documents": ["x"], "pin": "yes"}, "pin"),
    ({"documents": ["x"], "ttl_seconds": 5}, "ttl_seconds"),
    ({"documents": ["x"], "pin": True, "ttl_seconds": -1}, "ttl_seconds"),
])
def test_bad_pin_fields_get_a_400(server, body, param):
    r = preload(server, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


class _Pool:
    """The two BlockPool calls a pin makes, on a dict of cached page hashes."""

    def __init__(self, cached):
        self.cached, self.refs = set(cached), {}

    def get_cached_block(self, h, group_ids):
        return [h] if h in self.cached else None

    def touch(self, pages):
        for p in pages:
            self.refs[p] = self.refs.get(p, 0) + 1

    def free_blocks(self, pages):
        for p in pages:
            self.refs[p] -= 1


def test_pin_table_bound_expiry_and_missing_pages():
    from vllm_blockattn.engine.pins import PinError, PinTable

    pool, table = _Pool({"a1", "a2", "b1", "c1"}), PinTable(limit_pages=3)
    assert table.pin(pool, [0], [["a1", "a2"], ["x1"]], ttl=None) == \
        {"pinned": 1, "refreshed": 0, "missing": 1, "pinned_pages": 2}
    with pytest.raises(PinError, match="over the bound"):
        table.pin(pool, [0], [["b1"], ["c1"]], ttl=None)  # 2 + 2 > 3: nothing pinned
    assert pool.refs == {"a1": 1, "a2": 1} and table.pinned_pages == 2
    table.pin(pool, [0], [["b1"]], ttl=5.0)
    assert table.expire(pool, now=float("inf")) == 1 and pool.refs["b1"] == 0
    assert table.unpin(pool, [["a1", "a2"]]) == {"unpinned": 1, "pinned_pages": 0}
    assert pool.refs == {"a1": 0, "a2": 0, "b1": 0}


def test_pin_table_per_tenant_share():
    """One tenant (cache_salt) may hold at most its share of the pinnable pages; others still pin, and a
    released pin gives its pages back to its tenant."""
    from vllm_blockattn.engine.pins import PinError, PinTable

    pool = _Pool({"a1", "a2", "a3", "b1", "b2"})
    table = PinTable(limit_pages=5, tenant_limit_pages=2)
    table.pin(pool, [0], [["a1", "a2"]], ttl=None, tenant="alice")
    with pytest.raises(PinError, match="over its share of 2"):
        table.pin(pool, [0], [["a3"]], ttl=None, tenant="alice")
    assert pool.refs == {"a1": 1, "a2": 1} and table.tenant_pages("alice") == 2
    table.pin(pool, [0], [["b1", "b2"]], ttl=None, tenant="bob")
    table.pin(pool, [0], [["a3"]], ttl=None)  # requests without a cache_salt are a tenant of their own
    assert table.pinned_pages == 5 and table.tenant_pages(None) == 1
    table.unpin(pool, [["a1", "a2"]])
    assert table.tenant_pages("alice") == 0
    table.pin(pool, [0], [["a1"]], ttl=None, tenant="alice")
    assert table.tenant_pages("alice") == 1 and table.pinned_pages == 4


@pytest.mark.parametrize("value", [0, 1.5, "half", True])
def test_pin_tenant_fraction_is_checked_at_start_up(tiny_qwen3, value):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_blockattn.core.config import get_block_config

    cfg = EngineArgs(model=tiny_qwen3, attention_backend="blockattn", max_model_len=256,
                     additional_config={"blockattn": {"pin_tenant_fraction": value}}).create_engine_config()
    with pytest.raises(ValueError, match="pin_tenant_fraction"):
        get_block_config(cfg)
