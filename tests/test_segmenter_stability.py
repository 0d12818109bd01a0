"""Reuse-stable segmentation: a document is cut the same way in its interior wherever it appears
(learned segmenter with content windows, content-defined rule segmenter), and the stability metric
itself. Backbones are tiny and built on the fly; every property is checked over several seeds, and
the old position-dependent methods are shown to fail the same checks (the tests can fail)."""

import random

import pytest
import torch

from vllm_blockattn.eval.blocks import rule_based_segments
from vllm_blockattn.segmenter import Segmenter, segment_cuts, segment_text
from vllm_blockattn.segmenter.rules import rule_interior, stable_rule_cuts, stable_rule_segments
from vllm_blockattn.segmenter.stability import (
    Stability, learned_interior, random_contexts, spans, stability, surviving,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ("alpha beta gamma delta river stone cloud market engine lamp paper table seven orange quick "
         "def return class import value items yield print self None True".split())


def make_doc(rng: random.Random, lines: int, long_line_every: int = 0) -> str:
    """Lines of random words, paragraphs split by blank lines, sometimes an over-long line."""
    out = []
    for i in range(lines):
        n = rng.randint(2, 12)
        if long_line_every and i % long_line_every == long_line_every - 1:
            n = rng.randint(60, 90)  # longer than a chunk: exercises the single-piece window
        out.append(("    " if rng.random() < 0.2 else "") + " ".join(rng.choice(WORDS) for _ in range(n)) + ".")
        out.append("\n\n" if rng.random() < 0.25 else "\n")
    return "".join(out)


def embed(rng: random.Random, doc: str) -> tuple[str, str]:
    """Other text before and after ``doc``, of random length, joined by a line break or a blank line."""
    before = make_doc(rng, rng.randint(0, 30))
    after = make_doc(rng, rng.randint(0, 30))
    before = before[rng.randint(0, len(before)) :] if before else ""  # any offset, even mid-line
    prefix = before.rstrip("\n") + rng.choice(["\n", "\n\n", ""]) if before else ""
    suffix = rng.choice(["\n", "\n\n", ""]) + after if after else ""
    return prefix, suffix


@pytest.fixture(scope="module")
def segmenters(tiny_bert, tiny_qwen3):
    return {
        "encoder": Segmenter.from_backbone(tiny_bert, window=64, overlap=16, seed=1).eval(),
        "causal": Segmenter.from_backbone(tiny_qwen3, window=64, overlap=16, seed=1).eval(),
    }


def _probs_at(seg, text, offset):
    cands, probs = seg.candidate_probs(text)
    return {c - offset: p for c, p in zip(cands, probs)}


# ----- the learned segmenter ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_learned_interior_probabilities_are_identical_in_any_context(segmenters, kind):
    seg = segmenters[kind]
    assert seg.config.windowing == "content"  # the default
    checked = 0
    for seed in range(4):
        rng = random.Random(seed)
        doc = make_doc(rng, 70, long_line_every=17)
        interior = learned_interior(seg, doc)
        assert len(interior) > 10  # the property is not vacuous
        alone = _probs_at(seg, doc, 0)
        assert _probs_at(seg, doc, 0) == alone  # the document alone: always the same
        for _ in range(2):
            prefix, suffix = embed(rng, doc)
            inside = _probs_at(seg, prefix + doc + suffix, len(prefix))
            for c in interior:
                assert inside[c] == alone[c], (seed, c)  # bit-identical, not approximately equal
                checked += 1
    assert checked > 200


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_learned_interior_cuts_are_identical_in_any_context(segmenters, kind):
    seg = segmenters[kind]
    for seed in range(3):
        rng = random.Random(100 + seed)
        doc = make_doc(rng, 60)
        _c, probs = seg.candidate_probs(doc)
        th = sorted(probs)[len(probs) // 2]  # about half the candidates cut
        interior = learned_interior(seg, doc)
        lo, hi = interior[0], interior[-1]
        alone = [c for c in segment_cuts(doc, seg, [th]) if lo <= c <= hi]
        assert len(alone) > 5
        for _ in range(2):
            prefix, suffix = embed(rng, doc)
            whole = prefix + doc + suffix
            inside = [c - len(prefix) for c in segment_cuts(whole, seg, [th]) if lo <= c - len(prefix) <= hi]
            assert inside == alone
            # and the blocks between interior cuts are byte-identical blocks of the whole text
            blocks = segment_text(doc, seg, threshold=th)
            got = segment_text(whole, seg, threshold=th)
            keep = [lo <= a and b <= hi for a, b in spans(blocks)]
            assert all(s for s, k in zip(surviving(blocks, got, len(prefix)), keep) if k)


def test_depth_two_recuts_identical_level_one_blocks_identically(segmenters):
    seg = segmenters["encoder"]
    rng = random.Random(300)
    doc = make_doc(rng, 80)
    _c, probs = seg.candidate_probs(doc)
    top, low = sorted(probs)[3 * len(probs) // 4], sorted(probs)[len(probs) // 4]
    interior = learned_interior(seg, doc)
    inner1 = [c for c in segment_cuts(doc, seg, [top]) if interior[0] <= c <= interior[-1]]
    assert len(inner1) >= 3
    a, b = inner1[0], inner1[-1]  # the level-1 blocks between these are the same in any context
    alone = [c for c in segment_cuts(doc, seg, [top, low]) if a <= c <= b]
    assert len(alone) > len(inner1)  # level 2 cut inside them
    for _ in range(3):
        prefix, suffix = embed(rng, doc)
        got = [c - len(prefix) for c in segment_cuts(prefix + doc + suffix, seg, [top, low])]
        assert [c for c in got if a <= c <= b] == alone


def test_fixed_windows_are_position_dependent(segmenters):
    """The old start-aligned windows fail the interior check: the check can fail."""
    seg = Segmenter.from_backbone(segmenters["encoder"].backbone_path, window=64, overlap=16, seed=1,
                                  windowing="fixed").eval()
    content = segmenters["encoder"]
    rng = random.Random(7)
    doc = make_doc(rng, 70)
    interior = learned_interior(content, doc)
    alone = _probs_at(seg, doc, 0)
    moved = 0
    for _ in range(3):
        prefix, suffix = embed(rng, doc)
        if not prefix:
            prefix = "x\n" * 13
        inside = _probs_at(seg, prefix + doc + suffix, len(prefix))
        moved += sum(inside[c] != alone[c] for c in interior)
    assert moved > len(interior) // 2
    assert seg.receptive_field() is None and learned_interior(seg, doc) == []


def test_a_window_gives_the_same_states_in_any_batch(segmenters):
    """Windows run at their own padded width: batching windows of other texts (other widths) with
    them leaves every candidate's features bit-identical (what a server batching requests needs)."""
    seg = segmenters["encoder"]
    rng = random.Random(3)
    a, b = make_doc(rng, 30), make_doc(rng, 4)
    ea, eb = seg.encode(a), seg.encode(b)
    with torch.no_grad():
        fa = seg.features(ea.input_ids, ea.attention_mask, ea.readout_window, ea.readout_pos)
        width = max(ea.input_ids.shape[1], eb.input_ids.shape[1])
        pad = seg._pad_id()
        ids = torch.cat([torch.nn.functional.pad(eb.input_ids, (0, width - eb.input_ids.shape[1]), value=pad),
                         torch.nn.functional.pad(ea.input_ids, (0, width - ea.input_ids.shape[1]), value=pad)])
        mask = torch.cat([torch.nn.functional.pad(eb.attention_mask, (0, width - eb.input_ids.shape[1])),
                          torch.nn.functional.pad(ea.attention_mask, (0, width - ea.input_ids.shape[1]))])
        both = seg.features(ids, mask, torch.cat([eb.readout_window, ea.readout_window + eb.input_ids.shape[0]]),
                            torch.cat([eb.readout_pos, ea.readout_pos]), max_windows=3)
    assert torch.equal(both[len(eb.candidates):], fa)


def test_content_windows_cover_every_read_out_within_the_window(segmenters):
    for seg in segmenters.values():
        text = make_doc(random.Random(11), 120, long_line_every=9)
        enc = seg.encode(text)
        assert enc.input_ids.shape[1] <= seg.window
        left, right, longest = seg.margins()
        assert longest + left + right == seg.window - len(seg.prefix_ids) - len(seg.suffix_ids)
        # the read-out token is the piece end it should be (the marker for the encoder)
        if seg.marker_id is not None:
            assert (enc.input_ids[enc.readout_window, enc.readout_pos] == seg.marker_id).all()
        # identical windows are computed once
        rows = {tuple(r.tolist()) for r in enc.input_ids}
        assert len(rows) == enc.input_ids.shape[0]


# ----- the rule segmenter -------------------------------------------------------------------------


def _words(s: str) -> int:
    return len(s.split())


def test_rule_interior_cuts_are_identical_in_any_context():
    checked = 0
    for seed in range(6):
        rng = random.Random(seed)
        doc = make_doc(rng, 200, long_line_every=31)
        max_tokens = rng.choice([40, 64, 100])
        interior = set(rule_interior(doc, max_tokens, _words))
        assert interior
        alone = {c for c in stable_rule_cuts(doc, max_tokens, _words) if c in interior}
        for _ in range(3):
            prefix, suffix = embed(rng, doc)
            got = {c - len(prefix) for c in stable_rule_cuts(prefix + doc + suffix, max_tokens, _words)}
            assert {c for c in got if c in interior} == alone
            checked += len(alone)
    assert checked > 50


def test_rule_blocks_respect_the_budget_and_concatenate():
    rng = random.Random(5)
    for _ in range(5):
        doc = make_doc(rng, 150, long_line_every=13) + "x" * 900  # one word longer than the budget
        for max_tokens in (8, 50, 120):
            blocks = stable_rule_segments(doc, max_tokens, _words)
            assert "".join(blocks) == doc
            assert all(b.strip() for b in blocks[1:])
            chars = [len(b) for b in blocks]
            assert all(_words(b) <= max_tokens for b in blocks), (max_tokens, max(map(_words, blocks)), chars)
    assert stable_rule_segments("", 10, _words) == []
    assert stable_rule_segments("short text", 10, _words) == ["short text"]


def test_greedy_rule_packing_is_position_dependent():
    """The greedy packer cuts a document differently after other text: the check can fail."""
    differs = 0
    for seed in range(3):
        rng = random.Random(seed)
        doc = make_doc(rng, 500)
        interior = set(rule_interior(doc, 200, _words))
        alone = {a for a, _ in spans(rule_based_segments(doc, 200, _words))[1:]}
        for _ in range(3):
            prefix, suffix = embed(rng, doc)
            got = {a - len(prefix) for a, _ in spans(rule_based_segments(prefix + doc + suffix, 200, _words))}
            differs += {c for c in alone if c in interior} != {c for c in got if c in interior}
    assert differs >= 3  # 7 of 9 when written


# ----- the metric ---------------------------------------------------------------------------------


def test_surviving_needs_the_same_span_cut_at_both_ends():
    doc = ["aa\n", "bbb\n", "cc\n"]
    # the document at offset 4 inside "xyz\n" + doc + "tail"
    assert surviving(doc, ["xyz\n", "aa\n", "bbb\n", "cc\n", "tail"], 4) == [True, True, True]
    assert surviving(doc, ["xyz\naa\n", "bbb\n", "cc\ntail"], 4) == [False, True, False]
    assert surviving(doc, ["xyz\n", "aa\nbbb\n", "cc\n", "tail"], 4) == [False, False, True]
    # the same bytes elsewhere do not count: the span must be the document's own
    assert surviving(["aa\n"], ["aa\n", "aa\n"], 3) == [True]
    assert surviving(["aa\n"], ["aa\naa\n"], 3) == [False]
    assert spans(["ab", "c"], 5) == [(5, 7), (7, 8)]


def test_stability_weights_blocks_by_tokens_over_contexts():
    doc = "one two\nthree\nfour five six\n"

    def by_line(t):
        return t.splitlines(keepends=True)

    def every_nine(t):  # position-dependent: fixed-size blocks from the start of the text
        return [t[i : i + 9] for i in range(0, len(t), 9)]

    ctx = [("p\n", ""), ("", "\nq"), ("pp\n", "s")]
    assert stability(doc, by_line, ctx, count=_words).fraction == 1.0
    # every_nine: alone "one two\nt" "hree\nfour" " five six" "\n" ...
    res = stability(doc, every_nine, [("", "")], count=_words)
    assert res.fraction == 1.0 and res.per_context == [1.0]
    # shifted by 9 chars: the same spans come back (offset is a multiple of 9)
    assert stability(doc, every_nine, [("123456789", "")], count=_words).fraction == 1.0
    # shifted by 2: no span of the document survives
    res = stability(doc, every_nine, [("p\n", "")], count=_words)
    assert res.fraction == 0.0
    # weights: "x" joins the first line ("one two", 2 of 6 words); the other two lines survive
    half = stability(doc, by_line, [("x", "")], count=_words)
    assert half.stable_tokens == 4 and half.total_tokens == 6
    assert half.fraction == pytest.approx(4 / 6)
    total = Stability().add(half).add(stability(doc, by_line, [("", "")], count=_words))
    assert total.fraction == pytest.approx(10 / 12) and total.per_context == [pytest.approx(4 / 6), 1.0]
    with pytest.raises(ValueError):
        stability(doc, lambda t: [t[:-1]], [("", "")])


def test_random_contexts_vary_offsets_and_never_leave_the_document_alone():
    rng = random.Random(0)
    others = [make_doc(random.Random(i), 10) for i in range(5)]
    ctx = random_contexts(others, 20, rng, max_docs=2)
    assert len(ctx) == 20 and all(p or s for p, s in ctx)
    assert len({len(p) for p, _ in ctx}) > 5


def test_eval_hook_offers_the_stable_rule_segmenter():
    from vllm_blockattn.eval.blocks import FormOptions, segment

    doc = make_doc(random.Random(2), 300)
    opts = FormOptions(tokenizer_name=None, sink_token="<|block_sink|>", num_sinks=4, block_tokens=64,
                       max_length=None, segmenter="rule_stable")
    blocks = segment(doc, opts)
    assert "".join(blocks) == doc and len(blocks) > 5
    assert blocks == [b for b in stable_rule_segments(doc, 64, opts.count_tokens) if b.strip()]


@pytest.mark.parametrize("kind", ["encoder", pytest.param("causal", marks=pytest.mark.slow)])  # causal: 18 s
def test_many_texts_in_one_batch_give_each_text_its_own_result(segmenters, kind):
    """What batched segmentation (one request's documents together) relies on: scoring texts
    together (sharing windows between them) changes no probability and no cut, bit for bit."""
    from vllm_blockattn.segmenter import segment_cuts_many
    from vllm_blockattn.segmenter.api import segment_cuts_thresholds
    from vllm_blockattn.segmenter.candidates import SegmenterInputError

    seg = segmenters[kind]
    rng = random.Random(9)
    doc = make_doc(rng, 40, long_line_every=11)
    texts = [doc, "no candidate here", "", make_doc(rng, 8) + doc, doc]
    many = seg.candidate_probs_many(texts)
    assert many == [seg.candidate_probs(t) for t in texts]
    th = sorted(many[0][1])[len(many[0][1]) // 2]
    for thresholds in ([th], [th, th / 2]):
        assert segment_cuts_many(texts, seg, thresholds) == [segment_cuts(t, seg, thresholds) for t in texts]
    # several one-level thresholds from one scoring pass (train/segmenter_downstream.py)
    grid = [0.0, th / 2, th, 1.0]
    assert segment_cuts_thresholds(texts, seg, grid) == {g: segment_cuts_many(texts, seg, [g]) for g in grid}
    with pytest.raises(SegmenterInputError, match="threshold"):
        segment_cuts_thresholds(texts, seg, [1.5])


def test_appending_text_keeps_every_cut_before_the_old_end(segmenters):
    """A growing chat history: the old text is a prefix of the new one, so everything but the last
    ``receptive_field()`` tokens of the old text keeps its probabilities (no left edge)."""
    seg = segmenters["encoder"]
    rng = random.Random(21)
    history = make_doc(rng, 50)
    cands, probs = seg.candidate_probs(history)
    _ids, ends, _ = seg.tokenize_pieces(history, cands)
    keep = [c for i, c in enumerate(cands) if ends[i] + seg.receptive_field() <= ends[-2]]
    assert len(keep) > len(cands) // 2
    for _ in range(3):
        longer = history + make_doc(rng, rng.randint(1, 10))
        now = _probs_at(seg, longer, 0)
        assert all(now[c] == p for c, p in zip(cands, probs) if c in keep)


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_incremental_scoring_of_a_growing_history_equals_full_scoring(segmenters, kind):
    """A chat history scored turn by turn through PrefixScoreCache gives the probabilities of scoring
    each whole history, bit for bit, while the model reads only the new turn and the receptive field."""
    from vllm_blockattn.segmenter.incremental import PrefixScoreCache

    seg = segmenters[kind]
    cache = PrefixScoreCache(seg)
    rng = random.Random(5)
    history, full_chars = make_doc(rng, 40), 0
    texts = []
    for turn in range(6):
        # a turn appends whole lines, or continues the last line first (the last piece grows)
        history += ("" if turn % 3 else "and more words ") + make_doc(rng, rng.randint(2, 12))
        texts.append(history)
        full_chars += len(history)
        assert cache.probs_many([history]) == [seg.candidate_probs(history)]
    assert cache.reused > 0 and cache.scored_chars < 0.6 * full_chars
    # several texts at once, one of them unrelated; a text seen before comes from the cache whole
    other, longer = make_doc(rng, 15), texts[-1] + make_doc(rng, 3)
    scored_before = cache.scored_chars
    assert cache.probs_many([other, longer, texts[2]]) == [seg.candidate_probs(t) for t in (other, longer, texts[2])]
    assert cache.scored_chars - scored_before < len(other) + len(longer) - len(texts[-1]) // 2
