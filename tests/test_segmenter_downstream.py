"""The downstream segmenter evidence (train/segmenter_downstream.py): its task, the facts-cut count and
the two reuse accountings (block cache keyed by a block's own tokens; APC on whole pages)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ds():
    sys.path.insert(0, os.path.join(REPO, "train"))
    spec = importlib.util.spec_from_file_location("_segmenter_downstream", os.path.join(REPO, "train",
                                                                                        "segmenter_downstream.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def words(s):
    return s.split()


def test_wrapped_fact_records(ds):
    recs = ds.wrapped_fact_records(50, paragraphs=4, seed=3)
    assert recs == ds.wrapped_fact_records(50, paragraphs=4, seed=3)  # seeded
    wrapped_inside = 0
    for r in recs:
        assert r["text"] == "".join(r["paragraphs"]) and len(r["paragraphs"]) == 4
        assert all(p.endswith("\n\n") and "\n\n" not in p[:-2] for p in r["paragraphs"])
        facts = [tuple(f.split()) for f in " ".join(words(r["text"])).split(" .") if f.strip()]
        assert len(facts) == 8 and len({a for _, a, _ in facts}) == 8  # one fact per attribute
        name, attr = r["question"].split()
        assert (name, attr, r["answer"]) in facts
        bad, total = ds.facts_cut(r["text"], [i + 1 for i, ch in enumerate(r["text"][:-1]) if ch == "\n"])
        assert total == 8
        wrapped_inside += bad
    assert wrapped_inside > 0  # line breaks fall inside facts, as in hard-wrapped text
    assert len({tuple(len(p) for p in r["paragraphs"]) for r in recs}) > 10  # paragraph sizes vary
    with pytest.raises(ValueError, match="one per attribute"):
        ds.wrapped_fact_records(1, facts=9)
    with pytest.raises(ValueError, match="paragraphs"):
        ds.wrapped_fact_records(1, paragraphs=9)


def test_facts_cut(ds):
    text = "alice pet\ncat . bob city paris .\n\n"
    assert ds.facts_cut(text, []) == (0, 2)
    assert ds.facts_cut(text, [text.index("cat")]) == (1, 2)  # between attribute and value
    assert ds.facts_cut(text, [text.index("pet")]) == (0, 2)  # between name and attribute: the value keeps it
    assert ds.facts_cut(text, [text.index("bob"), text.index("paris")]) == (1, 2)


def test_block_reuse_is_keyed_by_block_tokens(ds):
    a, b, c = "one two\n", "three four five\n", "six\n"
    contexts = [a + b, b + a, a + c + b]
    cuts = [[len(a)], [len(b)], [len(a), len(a + c)]]
    hit, total = ds.block_reuse(contexts, cuts, words)
    # request 1: nothing cached; request 2: both blocks (5 tokens); request 3: a and b (5 of 6)
    assert (hit, total) == (10, 16)
    assert ds.block_reuse(contexts, [[] for _ in contexts], words) == (0, 16)  # one block each: no repeat


def test_prefix_reuse_counts_whole_pages(ds):
    t1 = " ".join(str(i) for i in range(40))
    t2 = " ".join(str(i) for i in range(35)) + " x y z w v"
    assert ds.prefix_reuse([t1, t2], words, page=16) == (32, 80)  # 2 whole pages shared
    assert ds.prefix_reuse([t1, t1], words, page=16) == (32, 80)  # the 8-token tail is no whole page
    assert ds.prefix_reuse([t1, "x " + t1], words, page=16) == (0, 81)  # a shifted prefix shares nothing


def test_rag_replay(ds):
    reqs = ds.rag_replay([f"s{i}" for i in range(20)], 30, 3, seed=1)
    assert len(reqs) == 30 and all(len(r) == 3 == len(set(r)) for r in reqs)
    assert reqs == ds.rag_replay([f"s{i}" for i in range(20)], 30, 3, seed=1)
    counts = sorted((sum(j in r for r in reqs) for j in range(20)), reverse=True)
    assert counts[0] > counts[-1]  # Zipf: some sections are popular


def test_method_cuts_rows(ds):
    from vllm_blockattn.segmenter.candidates import check_cuts

    recs = ds.wrapped_fact_records(5, seed=0)
    texts = [r["text"] for r in recs]
    learned = {"learned@0.8": [[r["text"].index(r["paragraphs"][1])] for r in recs]}
    cuts = ds.method_cuts(texts, learned, [4] * 5, tokenizer=None, seed=0)
    assert set(cuts) == {"learned@0.8", "one_block", "newline", "blank_line@natural", "heading@natural",
                         *(n for n in ds.K_BASELINES if n not in ("loss_topk", "entropy_topk"))}
    for name, per_text in cuts.items():
        for t, c in zip(texts, per_text):
            assert check_cuts(t, c) == sorted(c), name
    for name in ("random", "average", "punctuation", "blank_line", "random_candidate"):  # at the given count
        assert [len(c) for c in cuts[name]] == [3] * 5, name
    paragraph_starts = [[sum(len(p) for p in r["paragraphs"][:i]) for i in range(1, 4)] for r in recs]
    assert cuts["blank_line@natural"] == paragraph_starts == cuts["blank_line"]
    assert cuts["heading@natural"] == [[]] * 5  # no heading: one block
    assert ds.label("learned@0.8", 0.8) == "learned, threshold 0.8 (packaged default)"
    assert ds.label("learned@0.3", 0.8) == "learned, threshold 0.3"


def test_extra_heads_are_rows_at_their_own_threshold(ds):
    from types import SimpleNamespace

    texts = ["one\n\ntwo\n\nthree\n", "a\nb\n"]

    class Fake:  # candidate probabilities without a backbone: 0.9 at the first candidate, 0.5 at the rest
        config = SimpleNamespace(threshold=0.7)

        def candidate_probs_many(self, ts):
            from vllm_blockattn.segmenter.candidates import find_candidates

            return [(c, [0.9] + [0.5] * (len(c) - 1)) for c in (find_candidates(t) for t in ts)]

    rows = ds.extra_rows(texts, {"prose_model": Fake()})
    assert rows == {"prose_model@0.7": [[5], [2]]}
    assert ds.label("prose_model@0.7", 0.8, {"prose_model": "pkg:x/y"}) == \
        "learned, `prose_model` head, threshold 0.7 (its own)"
    assert ds.label("learned@0.8", 0.8, {"prose_model": "pkg:x/y"}) == "learned, threshold 0.8 (packaged default)"
    with pytest.raises(SystemExit):
        ds.main(["--extra-models", "learned=pkg:x/y", "--from-json", "/nonexistent"])
