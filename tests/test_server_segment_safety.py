"""Server-side segmentation on a shared server, against the real server (``vllm-blockattn serve``,
multi-process engine, loopback; the session's segmentation server: default ``auto`` from 300 tokens,
``max_model_len`` 2048, ``--enable-prompt-tokens-details``).

What one client must not be able to do to the others, each shown on the real server:

- make the segmenter work on text that cannot fit the model (refused before any segmentation);
- hold the segmenter while an honest request waits, or keep it busy after disconnecting;
- fail other clients' requests with a text the tokenizers cannot take (its own 400 names the field);
- learn through the segmenter's cache whether another tenant (``cache_salt``) sent a text (tested on
  the keying: the characters the segmenter runs through its backbone, not a timing);
- and the server's default segmentation must never fail a request that succeeds without it.
"""

import concurrent.futures as cf
import itertools
import string
import time
import zlib

import pytest
import requests

from vllm_blockattn.client import block_chat_request
from vllm_blockattn.core.layout import build_block_text

from tests._reference import load_hf
from tests._server import MODEL_NAME, SEGMENT_SERVER, completion, labelled_value, metric_value

MAX_TOKENS = 2
DOCS = [  # not the documents module's: the two modules share one server and its caches
    "Dora keeps bees behind the bakery and sells honey at the Saturday market.",
    "Emil repairs clocks in a narrow shop whose window faces the harbour.",
    "The ferry leaves at noon and returns at dusk, weather allowing.",
]
HONEST = "Dora keeps bees.\nEmil repairs clocks.\n\nQuestion: Who keeps bees? Answer:"
# The costliest text per token for the segmenter: short lines whose content-defined ranks (CRC-32)
# rise from line to line, so that no window holds more than one line: one backbone window per line
# (and no two alike). 676 lines are 1973 tokens for the tiny model (they fit the 2048-token window)
# and take the segmenter seconds per level; eight levels that cut nothing re-score the whole text
# eight times.
DENSE = "".join(sorted(("".join(p) + "\n" for p in itertools.product(string.ascii_lowercase, repeat=2)),
                       key=lambda line: zlib.crc32(line.encode())))
DENSE_SEGMENT = {"threshold": [0.9999] * 8}
LONG = "\n\n".join(f"Chapter {i}. {DOCS[i % 3]} The tale goes on with chapter {i}, the bees and the clocks."
                   for i in range(16))


@pytest.fixture(scope="module")
def server(segment_server):
    return segment_server


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return load_hf(tiny_qwen3)


def outcome(srv, name: str) -> float:
    return labelled_value(srv.metrics(), "vllm_blockattn:segmentations_total", outcome=name)


def scored_chars(srv) -> float:
    return metric_value(srv.metrics(), "vllm_blockattn:segmenter_scored_chars_total")


def pending(srv) -> float:
    return metric_value(srv.metrics(), "vllm_blockattn:segmenter_pending")


def post(srv, prompt, timeout=120, **body):
    return completion(srv.url, prompt, MAX_TOKENS, timeout=timeout, **body)


def chat(srv, messages, **body):
    return requests.post(srv.url + "/v1/chat/completions", timeout=120,
                         json={"model": MODEL_NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
                               "return_token_ids": True, **body})


def wait_for(predicate, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_text_that_cannot_fit_the_model_is_refused_before_segmentation(server):
    refused, scored = outcome(server, "refused"), scored_chars(server)
    oversized = "x\n" * 3000  # 6000 tokens: a third of the old character cap, three times the window
    r = post(server, oversized, segment="auto")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "refused before segmentation" in r.json()["error"]["message"]
    r = post(server, "Question: what is x? Answer:", segment="auto", documents=[oversized])
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents", r.text
    assert outcome(server, "refused") == refused + 2 and scored_chars(server) == scored  # no segmenter work
    # Without the field, the server's default leaves it alone: vLLM's own length error, as without the default.
    r = post(server, oversized)
    assert r.status_code == 400 and "segmentation" not in r.json()["error"]["message"], r.text
    assert scored_chars(server) == scored
    assert post(server, HONEST, segment="auto").status_code == 200


def test_a_dense_request_neither_stalls_others_nor_outlives_its_client(server, hf):
    """A request that costs the segmenter tens of seconds: an honest request sent meanwhile is
    answered while it still runs; when its client disconnects, its work stops."""
    assert len(hf[1].encode(DENSE)) <= 2048  # it fits the model: only the segmenter's rules can bound it
    cancelled = outcome(server, "cancelled")

    def attacker():
        try:
            r = post(server, DENSE, timeout=4, segment=DENSE_SEGMENT)
        except requests.exceptions.ReadTimeout:
            return "disconnected"
        return f"answered {r.status_code}: {r.text[:300]}"

    with cf.ThreadPoolExecutor(1) as pool:
        attack = pool.submit(attacker)
        assert wait_for(lambda: pending(server) >= 1, 10), "the dense request never reached the segmenter"
        r = post(server, HONEST, segment="auto")
        assert r.status_code == 200, r.text
        still_running = pending(server) >= 1
        assert attack.result() == "disconnected", "the dense request finished too soon to test anything"
    assert still_running  # the honest request did not wait for the dense one
    assert wait_for(lambda: pending(server) == 0, 15)  # its work stopped soon after the client left
    assert outcome(server, "cancelled") == cancelled + 1
    assert server.alive()


def test_a_poison_text_fails_alone_and_names_its_field(server):
    with cf.ThreadPoolExecutor(6) as pool:
        bad = pool.submit(post, server, "Question: which? Answer:", segment="auto", documents=[DOCS[0], "bad \ud800"])
        good = [pool.submit(post, server, f"Question: {i}? Answer:", segment="auto", documents=[DOCS[i % 3], LONG])
                for i in range(5)]
        bad, good = bad.result(), [g.result() for g in good]
    assert bad.status_code == 400, bad.text
    err = bad.json()["error"]
    assert err["param"] == "documents" and "documents[1]" in err["message"] and "surrogate" in err["message"]
    assert "TextEncodeInput" not in err["message"]
    assert all(g.status_code == 200 for g in good), [g.text for g in good if g.status_code != 200]
    r = chat(server, [{"role": "assistant", "content": "x \ud800"}, {"role": "user", "content": "hi"}],
             documents=[{"text": DOCS[0]}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "messages[0] is not valid Unicode" in r.json()["error"]["message"]
    assert server.alive()


def test_the_segmenter_cache_is_separate_per_tenant(server):
    """A text sent under one ``cache_salt`` is scored in full under another (as if nobody had sent
    it), and found again only under its own."""
    text = "A text only this test sends.\n\n" + LONG + "\n\nThe miller's ledger? Answer:"
    start = scored_chars(server)
    assert post(server, text, segment="auto", cache_salt="tenant-a").status_code == 200
    assert scored_chars(server) == start + len(text)
    assert post(server, text, segment="auto", cache_salt="tenant-a").status_code == 200
    assert scored_chars(server) == start + len(text)  # the same tenant: from the cache
    assert post(server, text, segment="auto", cache_salt="tenant-b").status_code == 200
    assert scored_chars(server) == start + 2 * len(text)  # another tenant: no hit
    assert post(server, text, segment="auto").status_code == 200
    assert scored_chars(server) == start + 3 * len(text)  # unsalted is a tenant of its own


def test_the_default_leaves_client_built_block_chats_as_sent(server, hf):
    """A block chat built by the client (``block_chat_request``), then a new turn: the default does
    not touch the sink groups, at any length (a 400 with the default off would be a 400 here too)."""
    _, tok, settings = hf
    for docs in ([DOCS[0]], [LONG, DOCS[1]]):
        first = block_chat_request(MODEL_NAME, docs, "Who keeps bees?")
        messages = [*first["messages"], {"role": "assistant", "content": "Dora."},
                    {"role": "user", "content": "And who repairs clocks?"}]
        r = chat(server, messages)
        assert r.status_code == 200, r.text
        off = chat(server, messages, segment="off")
        assert r.json()["prompt_token_ids"] == off.json()["prompt_token_ids"]


def test_the_default_leaves_a_chat_without_a_user_message_as_sent(server):
    r = chat(server, [{"role": "system", "content": LONG}])
    assert r.status_code == 200, r.text
    assert r.json()["prompt_token_ids"] == chat(server, [{"role": "system", "content": LONG}],
                                                segment="off").json()["prompt_token_ids"]


def test_the_default_leaves_a_long_client_built_block_message_as_sent(server, hf):
    _, tok, settings = hf
    content = build_block_text([LONG, DOCS[1], "Question: who repairs clocks?"])
    assert len(tok.encode(content)) >= SEGMENT_SERVER["min_tokens"]
    r = chat(server, [{"role": "user", "content": content}])
    assert r.status_code == 200, r.text
    ids = r.json()["prompt_token_ids"]
    assert ids == chat(server, [{"role": "user", "content": content}], segment="off").json()["prompt_token_ids"]
    assert ids.count(settings.sink_token_id) == 3 * settings.num_sinks  # the client's own blocks, as sent
    # the same prompt through completions is left as sent too
    r = post(server, content)
    assert r.status_code == 200 and r.json()["choices"][0]["prompt_token_ids"] == tok.encode(content), r.text
