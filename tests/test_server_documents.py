"""Documents and automatic segmentation through the standard OpenAI API (``server.py``), against the
real server on 127.0.0.1 with the OpenAI Python client, unchanged (``extra_body``).

The server runs with a default of automatic segmentation for prompts of 300 tokens or more, so one
server covers: explicit documents, explicit ``segment``, the server default, ``"segment": "off"``,
ordinary short prompts (untouched), malformed options (400s), and per-request reuse in
``usage.prompt_tokens_details.cached_tokens``.
"""

import pytest
import requests
from openai import BadRequestError, OpenAI

from vllm_blockattn import build_block_prompt, parse_block_prompt
from vllm_blockattn.core.reference import block_generate
from vllm_blockattn.segmenter import load_segmenter, segment_cuts, split_at, thresholds_for

from tests._reference import load_hf
from tests._server import MODEL_NAME, SEGMENT_SERVER, metric_value

DOCS = [
    "Alice moved to Paris in 2019 and works as a nurse at a large hospital near the river.",
    "Bob collects stamps from 42 countries and keeps them in a wooden chest in the attic.",
    "The river flows past the old mill, where the miller keeps his books in a wooden chest.",
]
QUESTION = "Question: Where does Alice live? Answer:"
MAX_TOKENS = 4
MIN_TOKENS = SEGMENT_SERVER["min_tokens"]
LONG = "\n\n".join(
    f"## Part {i}\n{DOCS[i % 3]} Then the story goes on with part {i}, and more about the mill and the chest.\n"
    f"Another line of part {i} with numbers {i * 7} and {i * 13}." for i in range(12)
) + "\n\nQuestion: Who keeps books in a chest? Answer:"
SERVER_SEGMENT = SEGMENT_SERVER


@pytest.fixture(scope="module")
def server(segment_server):
    return segment_server


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return load_hf(tiny_qwen3)


def reference(hf, ids):
    model, _, settings = hf
    return block_generate(model, ids, parse_block_prompt(ids, settings), max_new_tokens=MAX_TOKENS)


def complete(client, prompt, **extra_body):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True, **extra_body})


def segments(text, threshold=SERVER_SEGMENT["threshold"]):
    seg = load_segmenter(None)
    return split_at(text, segment_cuts(text, seg, thresholds_for(threshold, None)))


def chat_head_tail(tok, settings, messages):
    """The template's tokens before and after the last user message's content (rendered locally)."""
    sink = tok.convert_ids_to_tokens(settings.sink_token_id)
    marked = [*messages[:-1], {**messages[-1], "content": sink}]
    ids = tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    at = ids.index(settings.sink_token_id)
    return ids[:at], ids[at + 1:]


def test_completion_documents_build_the_block_prompt_and_match_the_reference(client, hf):
    _, tok, settings = hf
    docs = [DOCS[0], {"title": "Stamps", "text": DOCS[1]}]
    out = complete(client, QUESTION, documents=docs)
    want = build_block_prompt([DOCS[0], "Stamps\n" + DOCS[1], QUESTION], settings, tokenizer=tok)
    choice = out.choices[0]
    assert choice.prompt_token_ids == want
    assert out.usage.prompt_tokens == len(want)
    assert choice.token_ids == reference(hf, want)


def test_documents_reused_across_requests_in_any_order(client, server, hf):
    _, tok, settings = hf
    before = metric_value(server.metrics(), "vllm_blockattn:reused_block_tokens_total")
    first = complete(client, "Question: Who collects stamps? Answer:", documents=[DOCS[2], DOCS[1]])
    second = complete(client, "Question: Where is the mill? Answer:", documents=[DOCS[1], DOCS[2]])
    after = metric_value(server.metrics(), "vllm_blockattn:reused_block_tokens_total")
    x = tok.encode("x", add_special_tokens=False)
    block_tokens = sum(len(build_block_prompt([d, x], settings, tokenizer=tok)) - settings.num_sinks - len(x)
                       for d in DOCS[1:])  # each document's sinks and text
    assert after - before >= block_tokens  # both documents of the second request came from the block cache
    # Per request, in real tokens (no pads): the second one reused both documents, sinks included.
    assert second.usage.prompt_tokens_details.cached_tokens >= block_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details.cached_tokens <= second.usage.prompt_tokens
    want = build_block_prompt([DOCS[1], DOCS[2], "Question: Where is the mill? Answer:"], settings, tokenizer=tok)
    assert second.choices[0].token_ids == reference(hf, want)


def test_chat_documents_with_the_models_own_template(client, hf):
    _, tok, settings = hf
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"documents": [{"title": "Alice", "text": DOCS[0]}, {"text": DOCS[1]}], "ignore_eos": True,
                    "return_token_ids": True})
    head, tail = chat_head_tail(tok, settings, messages)
    want = build_block_prompt(["Alice\n" + DOCS[0], DOCS[1], tok.encode(QUESTION, add_special_tokens=False) + tail],
                              settings, tokenizer=tok, prefix=head)
    assert out.prompt_token_ids == want
    assert out.choices[0].token_ids == reference(hf, want)


def test_completion_segment_auto_cuts_with_the_servers_segmenter(client, hf):
    _, tok, settings = hf
    pieces = segments(LONG, 0.2)
    assert len(pieces) > 2  # the check below means something only if the text was cut
    out = complete(client, LONG, segment={"threshold": 0.2})
    want = build_block_prompt(pieces, settings, tokenizer=tok)
    assert out.choices[0].prompt_token_ids == want
    assert out.choices[0].token_ids == reference(hf, want)


def test_server_default_segments_long_prompts_and_leaves_short_ones(client, server, hf):
    _, tok, settings = hf
    assert len(tok.encode(LONG)) >= MIN_TOKENS
    out = complete(client, LONG)
    assert out.choices[0].prompt_token_ids == build_block_prompt(segments(LONG), settings, tokenizer=tok)
    short = complete(client, QUESTION)
    assert short.choices[0].prompt_token_ids == tok.encode(QUESTION)  # untouched, ordinary prompt
    off = complete(client, LONG, segment="off")
    assert off.choices[0].prompt_token_ids == tok.encode(LONG)
    hist = metric_value(server.metrics(), "vllm_blockattn:segmentation_seconds_count")
    assert hist >= 2


def test_chat_segment_auto_cuts_the_message_and_keeps_the_history_whole(client, hf):
    """The history before the last user message stays the head block (ordinary KV on the prefix
    chain, reused turn after turn); only the last message is cut, its last piece in the final block."""
    _, tok, settings = hf
    messages = [{"role": "user", "content": "Tell me about the mill."},
                {"role": "assistant", "content": DOCS[2] + "\n\n" + DOCS[1]},
                {"role": "user", "content": LONG}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                         temperature=0, extra_body={"segment": "auto", "return_token_ids": True,
                                                                    "ignore_eos": True})
    head, tail = chat_head_tail(tok, settings, messages)
    message_pieces = segments(LONG)
    assert len(message_pieces) > 2
    want = build_block_prompt([*message_pieces[:-1], tok.encode(message_pieces[-1], add_special_tokens=False) + tail],
                              settings, tokenizer=tok, prefix=head)
    assert out.prompt_token_ids == want
    assert out.choices[0].token_ids == reference(hf, want)


def test_chat_history_reused_turn_after_turn_with_the_default_on(client, hf):
    """A growing chat past the default's ``min_tokens``: each turn reuses the previous turn's history
    pages (``cached_tokens``), as stock prefix caching would; short turns stay ordinary prompts."""
    messages = [{"role": "system", "content": LONG}]
    cached = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"Question {turn}: what is in the chest?"})
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                             temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
        assert hf[2].sink_token_id not in out.prompt_token_ids  # nothing to cut: an ordinary prompt
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": out.choices[0].message.content or "ok"})
    page = 32
    assert all(c >= len(hf[1].encode(LONG)) - page for c in cached[1:]), cached


@pytest.mark.parametrize("body, param, words", [
    ({"documents": "one document"}, "documents", "must be a list"),
    ({"documents": [{"text": DOCS[0], "url": "x"}]}, "documents", "unknown keys"),
    ({"documents": [{"title": "no text"}]}, "documents", "'text'"),
    ({"documents": [""]}, "documents", "empty"),
    ({"documents": [DOCS[0] + "<|block_sink|>"]}, "documents", "sink"),
    ({"segment": "sometimes"}, "segment", "auto"),
    ({"segment": {"threshold": 0.3, "level": 2}}, "segment", "unknown"),
    ({"segment": {"threshold": 1.5}}, "segment", "threshold"),
    ({"segment": {"threshold": [0.3, 0.5], "depth": 3}}, "segment", "depth"),
])
def test_malformed_options_get_a_400_naming_the_field(server, body, param, words):
    r = requests.post(server.url + "/v1/completions", timeout=120,
                      json={"model": MODEL_NAME, "prompt": QUESTION, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err.get("param") == param, err
    assert server.alive()


def test_documents_need_a_single_text_prompt(client, server):
    with pytest.raises(BadRequestError, match="single string"):
        complete(client, [1, 2, 3], documents=[DOCS[0]])
    with pytest.raises(BadRequestError, match="single string"):
        complete(client, [QUESTION, QUESTION], documents=[DOCS[0]])
    with pytest.raises(BadRequestError, match="text only"):
        client.chat.completions.create(
            model=MODEL_NAME, max_tokens=2, extra_body={"documents": [{"text": DOCS[0]}]},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert server.alive()
