"""The API-server side of documents and automatic segmentation (``server.py``), without a server:
option parsing, the prompts built (exactly ``build_block_prompt`` of the named blocks), the segmenter
service (off the event loop, one model, concurrent requests) and real-token cache accounting."""

import asyncio
import threading
import time

import pytest

from vllm_blockattn import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.core.paged import pad_and_order
from vllm_blockattn.core.request_options import SegmentLimits
from vllm_blockattn.frontend.segment_service import SegmentationError
from vllm_blockattn.segmenter.work import checkpoint
from vllm_blockattn.frontend.server import (BlockRequestError, SegmentOptions, ServerBlocks, ServerSegmentConfig, chat_ids,
                                   completion_ids, new_segmenter_service, parse_documents, parse_segment)
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
    svc = new_segmenter_service(ServerSegmentConfig())
    monkeypatch.setattr(svc, "_segmenter", fake)
    text = "one\n\ntwo\n\nthree"

    async def many():
        loop_thread = threading.get_ident()
        outs = await asyncio.gather(*(svc.cut([text, "a\n\nb"], SegmentOptions()) for _ in range(8)))
        return loop_thread, outs

    loop_thread, outs = run(many())
    assert all(o == [["one\n\n", "two\n\n", "three"], ["a\n\n", "b"]] for o in outs)
    assert fake.threads and loop_thread not in fake.threads
    with pytest.raises(SegmentationError, match="depth") as e:
        run(svc.cut([text], SegmentOptions((0.3, 0.5), 3)))
    assert e.value.param == "segment" and e.value.status == 400


class _SlowFake(_FakeSegmenter):
    """Scores a text in one step per line, each a checkpoint apart (as the real segmenter's window
    layout and backbone chunks are); records the steps per text, and fails on a "boom" text."""

    def __init__(self, step_seconds=0.02):
        super().__init__()
        self.step_seconds = step_seconds
        self.steps: dict[str, int] = {}
        self.finished: dict[str, float] = {}

    def candidate_probs(self, text):
        if "boom" in text:
            raise TypeError("TextEncodeInput must be Union[...] (an internal message)")
        for _ in text.splitlines():
            checkpoint()
            time.sleep(self.step_seconds)
            self.steps[text] = self.steps.get(text, 0) + 1
        self.finished[text] = time.monotonic()
        return super().candidate_probs(text)


def _service(fake, monkeypatch, **limits):
    svc = new_segmenter_service(ServerSegmentConfig(limits=SegmentLimits(**limits)))
    monkeypatch.setattr(svc, "_segmenter", fake)
    return svc


BIG = "line\n" * 200  # 200 steps: 4 s of segmenter time
SMALL = "one\n\ntwo"


def test_a_large_request_cannot_hold_up_a_small_one(monkeypatch):
    """Turns: the small request, sent while the large one runs, waits about one step, not 4 s."""
    fake = _SlowFake()
    svc = _service(fake, monkeypatch)

    async def both():
        big = asyncio.ensure_future(svc.cut([BIG], SegmentOptions()))
        while not fake.steps.get(BIG):
            await asyncio.sleep(0.01)
        sent = time.monotonic()
        small = await svc.cut([SMALL], SegmentOptions())
        waited = time.monotonic() - sent
        return small, waited, await big

    small, waited, big = run(both())
    assert small == [["one\n\n", "two"]] and "".join(big[0]) == BIG
    assert fake.finished[SMALL] < fake.finished[BIG]
    assert fake.steps[BIG] == 200  # the large request's work completed too, in its own turns
    assert waited < 2.0, waited  # a few steps of 20 ms, not the 4 s the large request takes


def test_a_cancelled_request_takes_its_work_with_it(monkeypatch):
    fake = _SlowFake()
    svc = _service(fake, monkeypatch)

    async def cancel_big():
        big = asyncio.ensure_future(svc.cut([BIG], SegmentOptions()))
        while fake.steps.get(BIG, 0) < 3:
            await asyncio.sleep(0.01)
        big.cancel()  # what vLLM does to the handler when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await big
        await asyncio.sleep(0.3)
        steps = fake.steps[BIG]
        await asyncio.sleep(0.3)
        return steps, await svc.cut([SMALL], SegmentOptions())

    steps, small = run(cancel_big())
    assert steps < 40 and fake.steps[BIG] == steps and BIG not in fake.finished  # stopped, not finished
    assert small == [["one\n\n", "two"]] and svc._pending == 0


def test_budget_timeout_and_queue_bound_end_with_clear_errors(monkeypatch):
    fake = _SlowFake()
    svc = _service(fake, monkeypatch, budget_seconds=0.3)
    with pytest.raises(SegmentationError, match="budget of 0.3 s") as e:
        run(svc.cut([BIG], SegmentOptions()))
    assert e.value.status == 400 and e.value.outcome == "timed_out"
    assert fake.steps[BIG] < 40  # stopped at the budget, not after the whole text

    fake = _SlowFake()
    svc = _service(fake, monkeypatch, max_pending=1, timeout_seconds=0.5)

    async def two():
        big = asyncio.ensure_future(svc.cut([BIG], SegmentOptions()))
        await asyncio.sleep(0.05)
        with pytest.raises(SegmentationError, match="busy") as busy:
            await svc.cut([SMALL], SegmentOptions())
        with pytest.raises(SegmentationError, match="timeout of 0.5 s") as late:
            await big
        return busy.value, late.value

    busy, late = run(two())
    assert busy.status == 503 and busy.outcome == "refused"
    assert late.status == 503 and late.outcome == "timed_out"


def test_one_failing_request_fails_alone_without_internal_details(monkeypatch):
    fake = _SlowFake(step_seconds=0.01)
    svc = _service(fake, monkeypatch)

    async def mixed():
        return await asyncio.gather(svc.cut(["a\nboom\nb"], SegmentOptions()),
                                    *(svc.cut([f"x{i}\n\ny"], SegmentOptions()) for i in range(4)),
                                    return_exceptions=True)

    bad, *good = run(mixed())
    assert isinstance(bad, SegmentationError) and bad.status == 500 and "TextEncodeInput" not in str(bad)
    assert good == [[[f"x{i}\n\n", "y"]] for i in range(4)]


def test_texts_tokenizers_cannot_take_are_refused_naming_the_field(tok, settings):
    b = blocks_of(settings)
    with pytest.raises(BlockRequestError, match=r"documents\[1\] is not valid Unicode.*U\+D800") as e:
        run(completion_ids(b, tok, QUESTION, ["fine", "bad \ud800 text"], None))
    assert e.value.param == "documents"
    with pytest.raises(BlockRequestError, match="`prompt` is not valid Unicode") as e:
        run(completion_ids(b, tok, "q \udfff", None, "auto"))
    assert e.value.param == "prompt"
    with pytest.raises(BlockRequestError, match="NUL") as e:
        run(completion_ids(b, tok, "q\x00", None, "auto"))
    assert e.value.param == "prompt"


def test_text_that_cannot_fit_the_model_is_refused_before_segmentation(tok, settings, monkeypatch):
    fake = _SlowFake()
    b = ServerBlocks(settings, ServerSegmentConfig(), max_model_len=64)
    import vllm_blockattn.frontend.server as server

    monkeypatch.setattr(server, "segmenter_service", lambda cfg: pytest.fail("segmentation ran"))
    dense = "x\n" * 100  # a token per character: 200 tokens, far below the character cap
    for docs, param in [(None, "prompt"), ([dense], "documents")]:
        with pytest.raises(BlockRequestError, match="maximum context length of 64 tokens") as e:
            run(completion_ids(b, tok, dense if docs is None else QUESTION, docs, "auto"))
        assert e.value.param == param and not fake.steps


def test_the_server_default_never_fails_a_request(tok, settings, monkeypatch):
    """With ``default: auto``, whatever would succeed with the default off is left as sent."""
    import vllm_blockattn.frontend.server as server

    b = ServerBlocks(settings, ServerSegmentConfig(default="auto", min_tokens=8), max_model_len=4096)
    long_text = "word " * 50 + "\n\nmore words here " * 10
    # a client-built block prompt, at any length
    built = "<|block_sink|>" * 4 + long_text + "<|block_sink|>" * 4 + QUESTION
    assert run(completion_ids(b, tok, built, None, None)) is None
    # text the segmenter cannot take, or longer than the model
    assert run(completion_ids(b, tok, long_text + "\ud800", None, None)) is None
    assert run(completion_ids(ServerBlocks(settings, b.segment, max_model_len=16), tok, long_text, None, None)) is None

    # a busy segmenter: left as sent
    class Busy:
        async def cut(self, *a, **k):
            raise server.SegmentationError("busy", status=503, outcome="refused")

    monkeypatch.setattr(server, "segmenter_service", lambda cfg: Busy())
    assert run(completion_ids(b, tok, long_text, None, None)) is None
    messages = [{"role": "user", "content": "<|block_sink|>"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    rendered = list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)
    with pytest.raises(LookupError):
        run(chat_ids(b, tok, rendered, long_text, None, None))
    # sink tokens in the history (a client-built block chat): left as sent, not a 400
    with pytest.raises(LookupError):
        run(chat_ids(b, tok, [settings.sink_token_id] * 4 + rendered, long_text, None, None))
    # ...while asking for segmentation explicitly still names the problem
    with pytest.raises(BlockRequestError, match="placeholders"):
        run(chat_ids(b, tok, [settings.sink_token_id] * 4 + rendered, long_text, None, SegmentOptions()))


def test_merge_blank_is_linear_and_keeps_its_rule():
    """Whitespace-only blocks join the block before them (leading ones the first block with content),
    in one pass: a text of 40k blank lines cut everywhere is merged at once."""
    from vllm_blockattn.segmenter.api import _merge_blank

    assert _merge_blank("a\n\nb", [2, 3]) == [3]
    assert _merge_blank("  \n a\n \nb", [1, 3, 6]) == [6]
    assert _merge_blank(" \n \n", [2, 4]) == []
    dense = "\n \n" * 20000
    assert _merge_blank(dense, list(range(1, len(dense)))) == []
    words = "a\n" * 20000
    assert _merge_blank(words, list(range(2, len(words), 2))) == list(range(2, len(words), 2))


def test_growing_history_is_scored_from_its_new_end(tiny_bert, monkeypatch):
    """A chat history that grows turn by turn: the service scores only the new end (plus the
    segmenter's receptive field) and cuts exactly as the whole-text path does."""
    import random

    from vllm_blockattn.segmenter.api import segment_cuts_many
    from vllm_blockattn.segmenter.candidates import split_at
    from vllm_blockattn.segmenter.model import Segmenter

    seg = Segmenter.from_backbone(tiny_bert, window=64, overlap=16, seed=1).eval()
    assert seg.receptive_field() is not None
    svc = new_segmenter_service(ServerSegmentConfig())
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


def test_segmenter_cache_is_per_tenant_and_bounded_in_bytes(tiny_bert):
    """A text sent under one tenant (cache_salt, model) is never found under another: the second
    tenant's request is scored in full, as if nobody had sent it. The bound counts stored bytes."""
    from vllm_blockattn.segmenter.incremental import PrefixScoreCache
    from vllm_blockattn.segmenter.model import Segmenter

    seg = Segmenter.from_backbone(tiny_bert, window=64, overlap=16, seed=1).eval()
    text = "Ann: hello there, how are you\nBen: fine thanks\n" * 12
    cache = PrefixScoreCache(seg)
    a, b = ("salt-a", "tiny"), ("salt-b", "tiny")
    assert cache.probs_many([text], a) == seg.candidate_probs_many([text])
    assert cache.scored_chars == len(text)
    assert cache.probs_many([text], a) == seg.candidate_probs_many([text]) and cache.scored_chars == len(text)
    cache.probs_many([text], b)
    assert cache.scored_chars == 2 * len(text)  # another tenant: scored again, no hit
    grown = text + "Ann: one more turn\n"
    cache.probs_many([grown], ("salt-c", "tiny"))
    assert cache.scored_chars == 2 * len(text) + len(grown)  # a grown text extends its own tenant's texts only
    before = cache.scored_chars
    cache.probs_many([grown], a)
    assert cache.scored_chars - before < len(grown) // 2  # ...and does extend them

    one = cache.nbytes // 4  # about one entry's bytes (four stored)
    small = PrefixScoreCache(seg, max_bytes=int(one * 1.5))
    for i in range(3):
        small.probs_many([f"{i}: " + text], a)
        assert 0 < small.nbytes <= small.max_bytes and len(small._entries) == 1


def test_segmenter_that_cannot_load_fails_the_request_not_the_server():
    svc = new_segmenter_service(ServerSegmentConfig(model="/nonexistent/segmenter"))
    for _ in range(2):
        with pytest.raises(SegmentationError, match="not available"):
            run(svc.cut(["some text"], SegmentOptions()))


def test_real_tokens_before_counts_no_pads(settings):
    ids = build_block_prompt([[5] * 3, [6] * 40, [7] * 5], settings)
    layout = parse_block_prompt(ids, settings)
    physical, paged = pad_and_order(ids, layout, 32, 0, lambda b: b == 1)  # the long block moves first
    real = [t != 0 for t in physical]
    for slot in range(len(physical) + 1):
        assert paged.real_tokens_before(slot) == sum(real[:slot])
    assert paged.real_tokens_before(len(physical)) == len(ids)
