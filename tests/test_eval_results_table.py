"""The results-table script: rows from lm-eval result files and rows it runs itself."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LoCoMo's locomo10.json when BLOCKATTN_LOCOMO_PATH names it, else a small conversation of our own in
# its format (all five categories)
LOCOMO = os.environ.get("BLOCKATTN_LOCOMO_PATH") or os.path.join(ROOT, "tests", "fixtures", "parity",
                                                                 "locomo_conversation.json")


def load_script():
    spec = importlib.util.spec_from_file_location("results_table", os.path.join(ROOT, "eval", "results_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_from_lm_eval_results(tmp_path):
    rt = load_script()
    full = {"results": {"locomo": {"score,none": 0.5, "category_mean,none": 0.425},
                        "locomo_multi_hop": {"score,none": 0.25},
                        "locomo_temporal": {"score,none": 0.125}, "locomo_open_domain": {"score,none": 1.0},
                        "locomo_single_hop": {"score,none": 0.0}, "locomo_adversarial": {"score,none": 0.75}}}
    block = {"results": {"locomo_block": {"score,none": 0.3333, "blocks_per_prompt,none": 12.5},
                         "locomo_temporal_block": {"score,none": 0.2}}}
    (tmp_path / "full.json").write_text(json.dumps(full))
    (tmp_path / "block.json").write_text(json.dumps(block))
    table = rt.main(["--benchmark", "locomo", "--output_dir", str(tmp_path / "out"),
                     "--from_results", f"Full={tmp_path / 'full.json'}",
                     "--from_results", f"Block={tmp_path / 'block.json'}"])
    lines = table.splitlines()
    assert lines[0] == ("| Method | Multi-hop | Temporal | Open-domain | Single-hop | Adversarial | Avg | Avg (questions) "
                        "| Blocks/prompt |")
    # Avg: the mean of the category means (the paper's); results without category_mean fall back to score
    assert lines[2] == "| Full | 25.00 | 12.50 | 100.00 | 0.00 | 75.00 | 42.50 | 50.00 | - |"
    assert lines[3] == "| Block | - | 20.00 | - | - | - | 33.33 | 33.33 | 12.50 |"
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [r["form"] for r in saved["rows"]] == ["full", "block"]
    assert (tmp_path / "out" / "table.md").read_text() == table
    with pytest.raises(ValueError, match="neither 'longbench'"):
        rt.detect_form(full["results"], "longbench")


def test_table_runs_model_rows(tiny_qwen3, tmp_path):
    rt = load_script()
    with open(LOCOMO, encoding="utf-8") as f:
        (tmp_path / "locomo1.json").write_text(json.dumps(json.load(f)[:1]))
    metadata = {"locomo_path": str(tmp_path / "locomo1.json"), "max_length": 384}
    table = rt.main(["--benchmark", "locomo", "--output_dir", str(tmp_path / "out"), "--limit", "1",
                     "--gen_kwargs", "max_gen_toks=2", "--metadata", json.dumps(metadata), "--chat_template", "official",
                     "--row", "Training-free block", "hf-block",
                     f"pretrained={tiny_qwen3},sink_token=<|endoftext|>", "block+rule"])
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [(r["label"], r["form"], r["chat_template"]) for r in saved["rows"]] == [
        ("Training-free block", "block+rule", "official")]
    for i, row in enumerate(saved["rows"]):
        raw = json.loads((tmp_path / "out" / f"row{i}_results.json").read_text())
        suffix = "_block" if row["form"].startswith("block") else ""
        assert row["scores"]["Avg"] == round(100 * raw["locomo" + suffix]["category_mean,none"], 2)
        assert row["scores"]["Avg (questions)"] == round(100 * raw["locomo" + suffix]["score,none"], 2)
        assert row["scores"]["Blocks/prompt"] == round(raw["locomo" + suffix]["blocks_per_prompt,none"], 2)
        assert row["scores"]["Temporal"] == round(100 * raw["locomo_temporal" + suffix]["score,none"], 2)
    assert len(table.splitlines()) == 3


# LongBench pred.py: `if dataset not in ["trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"]:
# prompt = build_chat(...)` -- the tasks that get no chat template.
PRED_PY_NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


def test_longbench_chat_template_selection_per_task():
    from vllm_blockattn.eval import longbench

    for task in longbench.TASKS:
        assert longbench.uses_chat_template(task) == (task not in PRED_PY_NO_CHAT), task
    rt = load_script()
    for form, suffix in (("full", ""), ("block", "_block")):
        (with_t, on), (without, off) = rt.chat_template_split("longbench", form, "official")
        assert on and not off
        assert {t[len("longbench_"):len(t) - len(suffix)] for t in without} == PRED_PY_NO_CHAT
        assert len(with_t) == 15 and not set(with_t) & set(without)
        assert all(t.endswith(suffix) for t in with_t + without)
    assert rt.chat_template_split("longbench", "full", "none") == [(["longbench"], False)]
    assert rt.chat_template_split("longbench", "block", "all") == [(["longbench_block"], True)]
    assert rt.chat_template_split("locomo", "block", "official") == [(["locomo_block"], True)]
    with pytest.raises(ValueError, match="chat_template"):
        rt.chat_template_split("longbench", "full", "some")


def test_official_chat_rule_runs_two_passes_on_one_model_and_averages_like_lm_eval(monkeypatch, tmp_path):
    import lm_eval
    import lm_eval.api.registry as registry

    rt = load_script()
    made, calls = [], []

    class FakeLM:
        @classmethod
        def create_from_arg_obj(cls, args, extra):
            made.append(args)
            return cls()

    def simple_evaluate(model, tasks, apply_chat_template, **kw):
        calls.append((model, list(tasks), apply_chat_template, kw["gen_kwargs"], kw["system_instruction"]))
        # task score: 0.1 x its index among the 21 tasks, +0.05 under the chat template
        return {"results": {t: {"score,none": 0.01 * (len(t) % 7) + (0.05 if apply_chat_template else 0.0)}
                            for t in tasks}}

    monkeypatch.setattr(registry, "get_model", lambda name: FakeLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    results = rt.run_row("Block", "hf-block", "pretrained=M", "block+learned", "longbench", "eval/tasks",
                         {"longbench_dir": str(tmp_path)}, None, "max_gen_toks=2", "official", "Be brief.")
    assert made == [{"pretrained": "M"}] and len(calls) == 2 and calls[0][0] is calls[1][0]
    assert [c[4] for c in calls] == ["Be brief.", None]  # a system message only with the chat template
    assert [c[2] for c in calls] == [True, False] and calls[0][3] == "max_gen_toks=2"
    assert {t[len("longbench_"):-len("_block")] for t in calls[1][1]} == PRED_PY_NO_CHAT
    groups = rt.longbench_tasks("_block")
    for g, members in groups.items():
        want = sum(results[t]["score,none"] for t in members) / len(members)
        assert results[f"longbench_{g}_block"]["score,none"] == pytest.approx(want)
    overall = sum(results[f"longbench_{g}_block"]["score,none"] for g in groups) / len(groups)
    assert results["longbench_block"]["score,none"] == pytest.approx(overall)
    scores = rt.scores_from_results(results, "longbench", "block")
    assert scores["Avg"] == round(100 * overall, 2)
    assert scores["Blocks/prompt"] is None and None not in {k: v for k, v in scores.items() if k != "Blocks/prompt"}.values()


def test_forms_and_variant_rows():
    rt = load_script()
    assert rt.parse_form("full") == ("full", None) and rt.parse_form("block") == ("block", None)
    assert rt.parse_form("block+learned") == ("block", "learned")
    assert rt.parse_form("block+pkg.mod:cut") == ("block", "pkg.mod:cut")
    for bad in ("full+learned", "block+", "blocks"):
        with pytest.raises(ValueError, match="form"):
            rt.parse_form(bad)
    rows = rt.variant_rows("vllm", "TRAINED", "BASE", ["rule", "learned"], "<|endoftext|>")
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("Full", "vllm", "full"), ("Block (rule segmenter)", "vllm", "block+rule"),
        ("Block (learned segmenter)", "vllm", "block+learned"),
        ("Training-free block (rule segmenter)", "vllm", "block+rule")]
    assert json.loads(rows[0][2]) == {"pretrained": "TRAINED"}
    assert json.loads(rows[1][2]) == {"pretrained": "TRAINED", "attention_backend": "blockattn"}
    assert json.loads(rows[3][2]) == {"pretrained": "BASE", "attention_backend": "blockattn",
                                      "additional_config": {"blockattn": {"sink_token": "<|endoftext|>"}}}
    hf = rt.variant_rows("hf-block", "T", "B", ["rule"], "<|endoftext|>")
    assert hf[0][1] == "hf" and json.loads(hf[-1][2]) == {"pretrained": "B", "sink_token": "<|endoftext|>"}


def test_longbench_language_tables_as_the_leaderboard(tmp_path):
    """LongBench's leaderboard: one table per language, each category the mean of that language's
    tasks (lcc and repobench-p in both), Avg the mean of the six categories (e.g. GPT-3.5-Turbo-16k,
    English: (39.8 + 38.7 + 26.5 + 67.1 + 54.1 + 37.8) / 6 = 44.0)."""
    from vllm_blockattn.eval.longbench import TASKS

    rt = load_script()
    scores = {name: (i + 1) / 100 for i, name in enumerate(sorted(TASKS))}
    results = {f"longbench_{t}": {"score,none": v} for t, v in scores.items()}
    s = lambda *ts: sum(scores[t] for t in ts) / len(ts)  # noqa: E731
    en = rt.scores_from_results(results, "longbench", "full", "en")
    want_en = {"Single-Doc QA": s("narrativeqa", "qasper", "multifieldqa_en"),
               "Multi-Doc QA": s("hotpotqa", "2wikimqa", "musique"),
               "Summarization": s("gov_report", "qmsum", "multi_news"),
               "Few-shot": s("trec", "triviaqa", "samsum"),
               "Synthetic": s("passage_count", "passage_retrieval_en"), "Code": s("lcc", "repobench-p")}
    zh = rt.scores_from_results(results, "longbench", "full", "zh")
    want_zh = {"Single-Doc QA": s("multifieldqa_zh"), "Multi-Doc QA": s("dureader"), "Summarization": s("vcsum"),
               "Few-shot": s("lsht"), "Synthetic": s("passage_retrieval_zh"), "Code": s("lcc", "repobench-p")}
    for got, want in ((en, want_en), (zh, want_zh)):
        for label, value in want.items():
            assert got[label] == round(100 * value, 2), label
        assert got["Avg"] == round(100 * sum(want.values()) / 6, 2)
    block = {f"longbench_{t}_block": v for t, v in ((t, {"score,none": x}) for t, x in scores.items())}
    assert rt.scores_from_results(block, "longbench", "block", "zh") == zh
    with pytest.raises(ValueError, match="longbench"):
        rt.scores_from_results({}, "locomo", "full", "en")


def test_rows_run_with_thinking_off_unless_their_model_args_say_otherwise(monkeypatch, tmp_path):
    import lm_eval
    import lm_eval.api.registry as registry

    rt = load_script()
    made = []

    class FakeLM:
        @classmethod
        def create_from_arg_obj(cls, args, extra):
            made.append(args)
            return cls()

    monkeypatch.setattr(registry, "get_model", lambda name: FakeLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda model, tasks, **kw: {"results": {}})
    for model_args in ("pretrained=M", "pretrained=M,enable_thinking=True"):
        rt.run_row("Full", "vllm", model_args, "full", "locomo", "eval/tasks", {"locomo_path": str(tmp_path)}, None,
                   None)
    assert made[0]["enable_thinking"] is False and made[1]["enable_thinking"] is True
