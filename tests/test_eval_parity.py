"""Parity with the official runners on fixtures produced by the official code itself.

``tests/fixtures/parity/*.json`` hold (prediction, answers, expected score) cases scored once by
THUDM/LongBench's ``metrics.py`` (through ``eval.py``'s row rule) and snap-research/LoCoMo's
``task_eval/evaluation.py`` (see ``tests/fixtures/parity/README.md``); nothing official is imported here.
"""

import json
import os
from collections import Counter

import pytest

from vllm_blockattn.eval import locomo_metrics as lm
from vllm_blockattn.eval import longbench_metrics as lb

PARITY = os.path.join(os.path.dirname(__file__), "fixtures", "parity")


def _load(name):
    with open(os.path.join(PARITY, name), encoding="utf-8") as f:
        return json.load(f)


LB_CASES = _load("longbench_metrics.json")
LOCOMO_CASES = _load("locomo_metrics.json")


def test_fixtures_cover_every_metric_with_at_least_20_cases():
    counts = Counter(c["metric"] for c in LB_CASES)
    assert set(counts) == set(lb.METRICS) and min(counts.values()) >= 20, counts
    cats = Counter(c["category"] for c in LOCOMO_CASES)
    assert len(LOCOMO_CASES) >= 40 and set(cats) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("metric", sorted(lb.METRICS))
def test_longbench_scores_equal_the_official_code(metric):
    if metric in ("qa_f1_zh", "rouge_zh") and lb.ZH_TOKENIZER != "jieba":
        pytest.skip("the official Chinese scores use jieba")
    bad = []
    for c in (c for c in LB_CASES if c["metric"] == metric):
        got = lb.score_row(c["task"], metric, c["prediction"], c["answers"], c["all_classes"])
        if got != pytest.approx(c["expected"], abs=1e-9):
            bad.append((c["prediction"][:60], c["answers"][0][:40], c["note"], got, c["expected"]))
    assert not bad, bad


def test_rouge_recursion_option_scores_what_the_official_code_zeroes():
    overflow = [c for c in LB_CASES if c["metric"] in ("rouge", "rouge_zh") and "RecursionError" in c["note"]]
    assert len(overflow) >= 2
    for c in overflow:
        assert c["expected"] == 0.0
        assert lb.score_row(c["task"], c["metric"], c["prediction"], c["answers"]) == 0.0
        assert lb.score_row(c["task"], c["metric"], c["prediction"], c["answers"], rouge_recursion="score") > 0.99
    with pytest.raises(ValueError, match="recursion"):
        lb.rouge_l_score("a", "a", recursion="never")


def test_locomo_scores_equal_the_official_code():
    bad = []
    for c in LOCOMO_CASES:
        got = lm.score(c["prediction"], c["answer"], c["category"])
        if got != pytest.approx(c["expected"], abs=1e-12):
            bad.append((c, got))
    assert not bad, bad


def test_rouge_recursion_option_reaches_the_task_scores(tmp_path, monkeypatch):
    from vllm_blockattn.eval import longbench

    long_ref = " ".join(f"w{i}" for i in range(1200))  # one 1200-word "sentence": overflows officially
    row = {"input": "", "context": "a report", "answers": [long_ref], "length": 2, "all_classes": None, "_id": "r"}
    (tmp_path / "gov_report.jsonl").write_text(json.dumps(row) + "\n")
    doc = longbench.load("gov_report", longbench_dir=str(tmp_path))["test"][0]
    assert doc["rouge_recursion"] == "official"
    assert longbench.process_results(doc, [long_ref]) == {"score": 0.0}
    doc = longbench.load("gov_report", longbench_dir=str(tmp_path), rouge_recursion="score")["test"][0]
    assert longbench.process_results(doc, [long_ref])["score"] > 0.99
    monkeypatch.setenv("BLOCKATTN_ROUGE_RECURSION", "score")
    assert longbench.load("gov_report", longbench_dir=str(tmp_path))["test"][0]["rouge_recursion"] == "score"
    with pytest.raises(ValueError, match="rouge_recursion"):
        longbench.load("gov_report", longbench_dir=str(tmp_path), rouge_recursion="maybe")


def test_samsum_generation_and_first_line_rule():
    """samsum: pred.py stops at the newline token; the pack generates to the answer length with no
    stop string and the first-line rule cuts at that same newline, so the scores agree (see
    docs/eval.md for the one case that differs: a bare newline or EOS as the first greedy token)."""
    import yaml

    path = os.path.join(os.path.dirname(__file__), "..", "eval", "tasks", "longbench", "longbench_samsum.yaml")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f.read().replace("!function", ""))
    assert cfg["generation_kwargs"]["until"] == [] and cfg["generation_kwargs"]["max_gen_toks"] == 128
    ref = "Amanda baked cookies and will bring Jerry some tomorrow."
    stopped = "Amanda will bring Jerry cookies tomorrow.\n"  # official output, ends at the newline token
    longer = stopped + "Dialogue: Tom: hi\nSummary: Tom says hi."
    assert lb.score_row("samsum", "rouge", longer, [ref]) == lb.score_row("samsum", "rouge", stopped, [ref]) > 0


def test_longbench_prompts_answer_lengths_metrics_and_chat_rule_are_the_official_ones():
    """Against THUDM/LongBench config/dataset2prompt.json (SHA-256 of each template),
    config/dataset2maxlen.json, eval.py's dataset2metric and pred.py's no-chat-template list."""
    import hashlib

    from vllm_blockattn.eval import longbench

    official = _load("longbench_config.json")
    assert set(official["tasks"]) == set(longbench.TASKS)
    for name, want in official["tasks"].items():
        spec = longbench.TASKS[name]
        assert hashlib.sha256(spec.prompt.encode("utf-8")).hexdigest() == want["prompt_sha256"], name
        assert (spec.max_gen, spec.metric) == (want["maxlen"], want["metric"]), name
    assert sorted(longbench.NO_CHAT_TEMPLATE) == official["no_chat_template"]
