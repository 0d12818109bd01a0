"""Metric parity: LongBench and LoCoMo scorers against hand-derived values (from the official
definitions) and, where the official packages are installed, against them on fixed examples."""

import pytest

from vllm_blockattn.eval import locomo_metrics as lm
from vllm_blockattn.eval import longbench_metrics as lb


# ---- LongBench ---------------------------------------------------------------------------------
def test_qa_f1_normalises_articles_and_punctuation():
    # "eiffel tower paris" vs "eiffel tower": 2 shared tokens, p = 2/3, r = 1 -> F1 = 0.8.
    assert lb.qa_f1_score("The Eiffel Tower, Paris.", "Eiffel Tower") == pytest.approx(0.8)
    assert lb.qa_f1_score("an apple", "the Apple!") == 1.0
    assert lb.qa_f1_score("banana", "apple") == 0.0


def test_rouge_l_counts_unique_words_like_the_rouge_package():
    # ref unique words {the, cat, is, on, mat} (5), hyp {the, cat, sat, on, mat} (5); the LCS
    # "the cat on the mat" contributes the token SET {the, cat, on, mat} (4): p = r = 0.8.
    # (Google's rouge_score would give 5/6 here.)
    assert lb.rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)


def test_rouge_l_is_summary_level_over_sentences():
    # Sentences split on '.': every ref sentence meets every hyp sentence; the union of LCS tokens
    # is {a, b, c, d} = all 4 unique words on both sides -> F = 1 (a sequence LCS would give 0.5).
    assert lb.rouge_l_score("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-7)


def test_rouge_l_traceback_tie_rule():
    # ref "a b" vs hyp "b a": the rouge package's traceback moves along the hypothesis on a tie and
    # returns [b]; with hyp sentence "a" adding [a], the union is {a, b}: F = 1. Taking [a] at the
    # tie would give union {a} and F = 0.5.
    assert lb.rouge_l_score("b a. a", "a b") == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("pred", ["", ".", "..."])
def test_rouge_l_empty_prediction_scores_zero(pred):
    assert lb.rouge_l_score(pred, "a reference") == 0.0


def test_classification_keeps_official_iteration_quirk():
    classes = ["New", "York", "New York"]
    # matches [New, York, New York]; removing "New" shifts "York" into its slot and the loop skips
    # it, so [York, New York] remain: 1/2. (Without the quirk: 1.0.)
    assert lb.classification_score("New York", "New York", classes) == 0.5
    assert lb.classification_score("It is a City question", "City", ["City", "Date"]) == 1.0
    assert lb.classification_score("City or Date", "City", ["City", "Date"]) == 0.5
    assert lb.classification_score("nothing", "City", ["City", "Date"]) == 0.0
    # no class names: nothing matches, 0.0 as in LongBench (it used to raise here)
    assert lb.classification_score("City", "City", []) == 0.0


def test_count_and_retrieval():
    assert lb.count_score("There are 3 unique paragraphs, not 4", "3") == 0.5
    assert lb.count_score("no digits", "3") == 0.0
    assert lb.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert lb.retrieval_score("Paragraph 1 or Paragraph 12", "Paragraph 12") == 0.5
    assert lb.retrieval_zh_score("段落3", "段落3") == 1.0
    with pytest.raises(ValueError, match="Paragraph N"):
        lb.retrieval_score("1", "the first one")


def test_code_sim_takes_first_code_line_and_fuzz_ratio():
    pred = "```python\n# the answer\n    return mul(x, x)\nmore"
    assert lb.code_sim_score(pred, "    return mul(x, x)") == 1.0
    # difflib: 2 matching chars of 6 -> ratio 2*2/6 = 0.667 -> round(66.7) = 67.
    assert lb.fuzz_ratio("abc", "abd") == 67
    assert lb.fuzz_ratio("", "") == 100 and lb.fuzz_ratio("", "x") == 0
    assert lb.code_sim_score("// only a comment", "x = 1") == 0.0


def test_chinese_metrics():
    # jieba: [流入, 东海, 。] -> [流入, 东海]; characters: [流, 入, 东, 海] vs [东, 海]: both p=1/2, r=1.
    assert lb.qa_f1_zh_score("流入东海。", "东海") == pytest.approx(2 / 3)
    assert lb.qa_f1_zh_score("北京", "北京") == 1.0
    assert lb.rouge_zh_score("北京", "北京") == pytest.approx(1.0, abs=1e-7)


def test_score_row_first_line_rule_and_best_reference():
    classes = ["City", "Distance"]
    # trec keeps only the first line after leading newlines: "City" -> 1.0 (else 0.5).
    assert lb.score_row("trec", "classification", "\nCity\nDistance", ["City"], classes) == 1.0
    assert lb.score_row("hotpotqa", "qa_f1", "Paris", ["London", "Paris"]) == 1.0
    with pytest.raises(ValueError, match="unknown LongBench metric"):
        lb.score_row("hotpotqa", "bleu", "x", ["x"])
    with pytest.raises(ValueError, match="non-empty list"):
        lb.score_row("hotpotqa", "qa_f1", "x", "x")


CASES = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("a b. c d", "a c. b d"),
    ("b a. a", "a b"),
    ("Officials said the plan. It will cost money", "The plan will cost a lot of money. Officials agreed"),
    ("  spaced   words . and more", "words and more spaced"),
    ("x", "y"),
]


def test_rouge_matches_the_rouge_package():
    rouge = pytest.importorskip("rouge")
    r = rouge.Rouge()
    for pred, ref in CASES:
        want = r.get_scores([pred], [ref], avg=True)["rouge-l"]["f"]
        assert lb.rouge_l_score(pred, ref) == pytest.approx(want, abs=1e-9), (pred, ref)


def test_fuzz_ratio_matches_fuzzywuzzy():
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    for a, b in [("abc", "abd"), ("    return mul(x, x)", "return x * x"), ("", "a"), ("same", "same"),
                 ("for i in range(10):", "for j in range(n):")]:
        assert lb.fuzz_ratio(a, b) == fuzz.ratio(a, b), (a, b)


def test_matches_lm_eval_longbench_metrics():
    official = pytest.importorskip("lm_eval.tasks.longbench.metrics", exc_type=ImportError)
    classes = ["New", "York", "New York"]
    assert lb.classification_score("New York", "New York", classes) == official.classification_score(
        "New York", "New York", all_classes=classes)
    for pred, ref in CASES:
        assert lb.qa_f1_score(pred, ref) == pytest.approx(official.qa_f1_score(pred, ref))
    for pred, ref in [("流入东海。", "东海"), ("会议讨论了预算和人员安排。", "会议讨论了预算。")]:
        assert lb.qa_f1_zh_score(pred, ref) == pytest.approx(official.qa_f1_zh_score(pred, ref))
        assert lb.rouge_zh_score(pred, ref) == pytest.approx(official.rouge_zh_score(pred, ref), abs=1e-9)


# ---- LoCoMo ------------------------------------------------------------------------------------
def test_locomo_normalisation_drops_commas_articles_and_and():
    assert lm.normalize_answer("The cat, and the dog!") == "cat dog"
    assert lm.normalize_answer(2022) == "2022"


def test_locomo_f1_uses_porter_stems():
    # stems: [run, dog] vs [dog, run] -> F1 = 1 (without stemming: 0).
    assert lm.f1_score("running dogs", "the dog runs") == 1.0
    # [7, may, 2023] vs [may, 2023]: p = 2/3, r = 1 -> 0.8
    assert lm.f1_score("7 May, 2023", "May 2023") == pytest.approx(0.8)


def test_locomo_category_rules():
    # multi-hop: answer parts [London, Berlin]; best part-F1 1 and 0 -> mean 0.5
    assert lm.score("Paris, London", "London, Berlin", 1) == 0.5
    # open-domain: only the answer before ';' counts
    assert lm.score("yes", "yes; because she likes it", 3) == 1.0
    assert lm.score("7 may 2023", "7 May 2023", 2) == 1.0
    assert lm.score("No information available", "self-care", 5) == 1.0
    assert lm.score("It is not mentioned in the conversation", "x", 5) == 1.0
    assert lm.score("self-care is important", "x", 5) == 0.0
    with pytest.raises(ValueError, match="category"):
        lm.score("x", "y", 6)


def test_locomo_postprocess():
    opts = {"a": lm.NO_INFO, "b": "self-care is important"}
    assert lm.postprocess("(a)", 5, opts) == lm.NO_INFO
    assert lm.postprocess(" (b) self-care\n(a)", 5, opts) == "self-care is important"
    assert lm.postprocess("Answer: (b) 7 May 2023\nmore text", 2) == "7 may 2023"
    with pytest.raises(ValueError, match="options"):
        lm.postprocess("(a)", 5, None)


def test_adversarial_option_order_is_stable_and_mixed():
    orders = {lm.adversarial_options(f"conv-{i}/{i}") for i in range(20)}
    assert orders == {("a", "b"), ("b", "a")}
    assert lm.adversarial_options("conv-26/7") == lm.adversarial_options("conv-26/7")
