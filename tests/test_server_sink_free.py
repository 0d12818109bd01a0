"""A checkpoint trained without sinks behind the OpenAI server: documents, segmentation, the text form
and chat all place the model's boundary token (one per block), the answers equal the reference, and
stray boundary tokens are a 400 while the server keeps serving."""

import pytest
from openai import BadRequestError, OpenAI

from vllm_blockattn import build_block_prompt
from vllm_blockattn.core.layout import BOUNDARY_TOKEN, build_block_text
from vllm_blockattn.segmenter import load_segmenter, segment_cuts, split_at, thresholds_for

from tests._reference import load_hf
from tests._server import MODEL_NAME, serve
from tests.test_server_documents import DOCS, MAX_TOKENS, QUESTION, complete, reference

LONG = "\n\n".join(
    f"## Part {i}\n{DOCS[i % 3]} Then the story goes on with part {i}, and more about the mill and the chest."
    for i in range(8)) + "\n\nQuestion: Who keeps books in a chest? Answer:"

pytestmark = pytest.mark.slow  # a server of its own (the offline engine tests are in test_sink_free.py)


@pytest.fixture(scope="module")
def server(tiny_sinkfree, tmp_path_factory):
    with serve(tiny_sinkfree, tmp_path_factory.mktemp("sinkfree-server"), "--enable-prompt-tokens-details") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf(tiny_sinkfree):
    return load_hf(tiny_sinkfree)


def test_documents_segmentation_and_the_text_form_match_the_reference(client, hf):
    _, tok, settings = hf
    out = complete(client, QUESTION, documents=[DOCS[0], DOCS[1]])
    want = build_block_prompt([DOCS[0], DOCS[1], QUESTION], settings, tokenizer=tok)
    assert want.count(settings.boundary_token_id) == 3
    assert out.choices[0].prompt_token_ids == want
    assert out.choices[0].token_ids == reference(hf, want)
    # the same documents again, in another order: served from the block cache, same semantics
    again = complete(client, QUESTION, documents=[DOCS[1], DOCS[0]])
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    want = build_block_prompt([DOCS[1], DOCS[0], QUESTION], settings, tokenizer=tok)
    assert again.choices[0].token_ids == reference(hf, want)
    # a client that sends text places the boundary token itself
    text = build_block_text([DOCS[2], QUESTION], BOUNDARY_TOKEN, 0)
    out = complete(client, text)
    ids = out.choices[0].prompt_token_ids
    assert ids.count(settings.boundary_token_id) == 2
    assert out.choices[0].token_ids == reference(hf, ids)
    # the server's segmenter
    seg = load_segmenter(None)
    pieces = split_at(LONG, segment_cuts(LONG, seg, thresholds_for(0.2, None)))
    assert len(pieces) > 2
    out = complete(client, LONG, segment={"threshold": 0.2})
    want = build_block_prompt(pieces, settings, tokenizer=tok)
    assert out.choices[0].prompt_token_ids == want
    assert out.choices[0].token_ids == reference(hf, want)


def test_chat_documents_use_the_boundary_placeholder(client, hf):
    _, tok, settings = hf
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"documents": [{"text": DOCS[0]}, {"text": DOCS[1]}], "ignore_eos": True,
                    "return_token_ids": True})
    marked = [messages[0], {**messages[1], "content": BOUNDARY_TOKEN}]
    rendered = tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=True, return_dict=False)
    rendered = list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)
    at = rendered.index(settings.boundary_token_id)
    want = build_block_prompt([DOCS[0], DOCS[1], tok.encode(QUESTION, add_special_tokens=False) + rendered[at + 1:]],
                              settings, tokenizer=tok, prefix=rendered[:at])
    assert out.prompt_token_ids == want
    assert out.choices[0].token_ids == reference(hf, want)


def test_stray_boundary_tokens_are_a_400_and_the_server_keeps_serving(client, server, hf):
    with pytest.raises(BadRequestError, match="boundary token"):
        complete(client, QUESTION, documents=[DOCS[0] + BOUNDARY_TOKEN + DOCS[1]])
    with pytest.raises(BadRequestError, match="boundary token run of length 2"):
        complete(client, BOUNDARY_TOKEN + DOCS[0] + BOUNDARY_TOKEN * 2 + QUESTION)
    with pytest.raises(BadRequestError, match="ends the prompt"):
        complete(client, DOCS[0] + BOUNDARY_TOKEN)
    with pytest.raises(BadRequestError, match="boundary token"):
        client.chat.completions.create(
            model=MODEL_NAME, max_tokens=2, extra_body={"documents": [{"text": DOCS[0]}]},
            messages=[{"role": "user", "content": "Is " + BOUNDARY_TOKEN + " here?"}])
    assert server.alive()
    _, tok, settings = hf
    out = complete(client, QUESTION, documents=[DOCS[2]])
    assert out.choices[0].token_ids == reference(hf, build_block_prompt([DOCS[2], QUESTION], settings, tokenizer=tok))
