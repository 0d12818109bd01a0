"""The API-server side of documents and automatic segmentation (``server.py``), without a server:
option parsing, the prompts built (exactly ``build_block_prompt`` of the named blocks), the segmenter
service (off the event loop, one model, concurrent requests) and real-token cache accounting."""

import asyncio
import threading
import time

import pytest

from vllm_blockattn import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.paged import pad_and_order
from vllm_blockattn.server import (BlockRequestError, SegmenterService, SegmentOptions, ServerBlocks,
                                   ServerSegmentConfig, chat_ids, completion_ids, parse_documents, parse_segment)
from vllm_blockattn.tiny import build_tokenizer

DOCS = ["Alice moved to Paris in 2019.", "Bob collects stamps from 42 countries."]
QUESTION = "Question: Where does Alice live? Answer:"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def settings(tok):
    return BlockSettings.from_tokenizer(tok)


def blocks_of(settings, **segment):
    return ServerBlocks(settings, ServerSegmentConfig(**segment), max_model_len=4096)


def run(coro):
    return asyncio.run(coro)


def test_parse_documents_and_segment():
    assert parse_documents(None) is None and parse_documents([]) is None
    assert parse_documents(["a", {"text": "b"}, {"title": "T", "text": "c"}]) == ["a", "b", "T\nc"]
    assert parse_segment(None) is None and parse_segment("off") == "off"
    assert parse_segment("auto") == SegmentOptions()
    assert parse_segment({"threshold": [0.3, 0.5]}) == SegmentOptions((0.3, 0.5), None)
    for bad, words in [("x", "must be a list"), ([{"text": "a", "id": 1}], "unknown keys"), ([3], "string or an"),
                       ([" "], "empty"), ([{"text": 3}], "'text'")]:
        with pytest.raises(BlockRequestError, match=words) as e:
            parse_documents(bad)
        assert e.value.param == "documents"
    for bad in ["always", 3, {"thresh": 0.5}, {"threshold": 2.0}, {"threshold": "0.5"}, {"depth": 0},
                {"threshold": [0.2, 0.4], "depth": 3}, {"depth": 1000}, {"threshold": [0.5] * 9}]:
        with pytest.raises(BlockRequestError) as e:
            parse_segment(bad)
        assert e.value.param == "segment"


def test_server_segment_config_is_checked_at_start_up():
    cfg = ServerSegmentConfig.from_additional_config({"blockattn": {"segment": {"default": "auto", "min_tokens": 10,
                                                                                "threshold": [0.3, 0.6]}}})
    assert cfg.default == "auto" and cfg.min_tokens == 10 and cfg.threshold == (0.3, 0.6)
    assert ServerSegmentConfig.from_additional_config(None) == ServerSegmentConfig()
    for bad in [{"default": "on"}, {"min_tokens": -1}, {"mode": "auto"}, {"threshold": 7}, "auto"]:
        with pytest.raises(ValueError):
            ServerSegmentConfig.from_additional_config({"blockattn": {"segment": bad}})


def test_completion_documents_equal_build_block_prompt(tok, settings):
    b = blocks_of(settings)
    ids = run(completion_ids(b, tok, QUESTION, [DOCS[0], {"title": "T", "text": DOCS[1]}], None))
    assert ids == build_block_prompt([DOCS[0], "T\n" + DOCS[1], QUESTION], settings, tokenizer=tok)
    # Nothing asked, no server default: the request is left alone.
    assert run(completion_ids(b, tok, QUESTION, None, None)) is None
    assert run(completion_ids(b, tok, [1, 2, 3], None, None)) is None
    with pytest.raises(BlockRequestError, match="single string"):
        run(completion_ids(b, tok, [1, 2, 3], DOCS, None))
    with pytest.raises(BlockRequestError, match="sink"):
        run(completion_ids(b, tok, QUESTION, [DOCS[0] + "<|block_sink|>"], None))
    with pytest.raises(BlockRequestError, match="sink"):
        run(completion_ids(b, tok, "<|block_sink|>" * 4 + QUESTION, DOCS, None))
    small = ServerBlocks(settings, ServerSegmentConfig(), max_model_len=4)
    with pytest.raises(BlockRequestError, match="characters"):
        run(completion_ids(small, tok, QUESTION, ["x" * 200], None))


def test_chat_prompt_keeps_the_template_head_and_tail(tok, settings):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|block_sink|>"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    rendered = list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)
    at = rendered.index(settings.sink_token_id)
    head, tail = rendered[:at], rendered[at + 1:]
    ids = run(chat_ids(blocks_of(settings), tok, rendered, QUESTION, DOCS, None))
    want = build_block_prompt([*DOCS, tok.encode(QUESTION, add_special_tokens=False) + tail], settings,
                              tokenizer=tok, prefix=head)
    assert ids == want
    layout = parse_block_prompt(ids, settings)
    assert len(layout.context_blocks) == 3 and ids[: len(head)] == head  # the head is a block of its own
    with pytest.raises(LookupError):  # nothing to do
        run(chat_ids(blocks_of(settings), tok, rendered, QUESTION, None, None))
    with pytest.raises(BlockRequestError, match="placeholders"):
        run(chat_ids(blocks_of(settings), tok, rendered + [settings.sink_token_id], QUESTION, DOCS, None))


class _FakeSegmenter:
    """Cuts at every blank line; records the thread it ran on."""

    class config:  # noqa: N801 - mimics SegmenterConfig
        threshold = 0.5

    def __init__(self):
        self.threads = set()

    def candidate_probs(self, text):
        self.threads.add(threading.get_ident())
        cands = [i + 2 for i in range(len(text) - 1) if text[i : i + 2] == "\n\n" and i + 2 < len(text)]
        return cands, [0.9] * len(cands)


def test_segmenter_service_runs_off_the_loop_and_serves_concurrent_requests(tok, settings, monkeypatch):
    fake = _FakeSegmenter()
    svc = SegmenterService(ServerSegmentConfig())
    monkeypatch.setattr(svc, "_segmenter", fake)
    text = "one\n\ntwo\n\nthree"

    async def many():
        loop_thread = threading.get_ident()
        outs = await asyncio.gather(*(svc.cut([text, "a\n\nb"], SegmentOptions()) for _ in range(8)))
        return loop_thread, outs

    loop_thread, outs = run(many())
    assert all(o == [["one\n\n", "two\n\n", "three"], ["a\n\n", "b"]] for o in outs)
    assert fake.threads and loop_thread not in fake.threads
    with pytest.raises(BlockRequestError, match="depth"):
        run(svc.cut([text], SegmentOptions((0.3, 0.5), 3)))


class _BatchingFake(_FakeSegmenter):
    """Scores several texts per call; the first call is slow so that later requests queue up."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def candidate_probs_many(self, texts):
        if not self.calls:
            time.sleep(0.3)
        self.calls.append(len(texts))
        return [self.candidate_probs(t) for t in texts]


def test_concurrent_requests_are_segmented_in_one_batch(monkeypatch):
    fake = _BatchingFake()
    svc = SegmenterService(ServerSegmentConfig())
    monkeypatch.setattr(svc, "_segmenter", fake)

    async def many():
        first = asyncio.ensure_future(svc.cut(["x\n\ny"], SegmentOptions()))
        await asyncio.sleep(0.1)  # the thread is busy with the first request
        rest = await asyncio.gather(*(svc.cut([f"a{i}\n\nb", "c"], SegmentOptions()) for i in range(6)),
                                    svc.cut(["q\n\nr"], SegmentOptions((0.5, 0.5), None)))
        return await first, rest

    first, rest = run(many())
    assert first == [["x\n\n", "y"]]
    assert rest[:6] == [[[f"a{i}\n\n", "b"], ["c"]] for i in range(6)] and rest[6] == [["q\n\n", "r"]]
    # one call for the first request; then per level one call for the six requests with the same
    # thresholds (12 texts), and the two-level request on its own
    assert fake.calls[0] == 1 and 12 in fake.calls and len(fake.calls) <= 5


def test_growing_history_is_scored_from_its_new_end(tiny_bert, monkeypatch):
    """A chat history that grows turn by turn: the service scores only the new end (plus the
    segmenter's receptive field) and cuts exactly as the whole-text path does."""
    import random

    from vllm_blockattn.segmenter.api import segment_cuts_many
    from vllm_blockattn.segmenter.candidates import split_at
    from vllm_blockattn.segmenter.model import Segmenter

    seg = Segmenter.from_backbone(tiny_bert, window=64, overlap=16, seed=1).eval()
    assert seg.receptive_field() is not None
    svc = SegmenterService(ServerSegmentConfig())
    monkeypatch.setattr(svc, "_segmenter", seg)
    rng = random.Random(3)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()

    def turn(n):
        return "".join(f"{rng.choice(['Ann', 'Ben'])}: {' '.join(rng.choices(words, k=rng.randint(3, 12)))}\n"
                       for _ in range(n))

    history, total = turn(30), 0
    probs = [p for _c, p in seg.candidate_probs_many([history])][0]
    th = sorted(probs)[len(probs) // 2]  # a threshold that cuts about half the candidates
    for _ in range(4):
        history += turn(rng.randint(2, 6))
        total += len(history)
        got = run(svc.cut([history], SegmentOptions(th, 1)))
        assert got == [split_at(history, segment_cuts_many([history], seg, [th])[0])]
    assert svc._prefix_cache.scored_chars < 0.7 * total and svc._prefix_cache.reused > 0


def test_segmenter_that_cannot_load_fails_the_request_not_the_server():
    svc = SegmenterService(ServerSegmentConfig(model="/nonexistent/segmenter"))
    for _ in range(2):
        with pytest.raises(BlockRequestError, match="not available"):
            run(svc.cut(["some text"], SegmentOptions()))


def test_real_tokens_before_counts_no_pads(settings):
    ids = build_block_prompt([[5] * 3, [6] * 40, [7] * 5], settings)
    layout = parse_block_prompt(ids, settings)
    physical, paged = pad_and_order(ids, layout, 32, 0, lambda b: b == 1)  # the long block moves first
    real = [t != 0 for t in physical]
    for slot in range(len(physical) + 1):
        assert paged.real_tokens_before(slot) == sum(real[:slot])
    assert paged.real_tokens_before(len(physical)) == len(ids)
