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
    full = {"results": {"locomo": {"score,none": 0.5}, "locomo_multi_hop": {"score,none": 0.25},
                        "locomo_temporal": {"score,none": 0.125}, "locomo_open_domain": {"score,none": 1.0},
                        "locomo_single_hop": {"score,none": 0.0}, "locomo_adversarial": {"score,none": 0.75}}}
    block = {"results": {"locomo_block": {"score,none": 0.3333}, "locomo_temporal_block": {"score,none": 0.2}}}
    (tmp_path / "full.json").write_text(json.dumps(full))
    (tmp_path / "block.json").write_text(json.dumps(block))
    table = rt.main(["--benchmark", "locomo", "--output_dir", str(tmp_path / "out"),
                     "--from_results", f"Full={tmp_path / 'full.json'}",
                     "--from_results", f"Block={tmp_path / 'block.json'}"])
    lines = table.splitlines()
    assert lines[0] == "| Method | Multi-hop | Temporal | Open-domain | Single-hop | Adversarial | Avg |"
    assert lines[2] == "| Full | 25.00 | 12.50 | 100.00 | 0.00 | 75.00 | 50.00 |"
    assert lines[3] == "| Block | - | 20.00 | - | - | - | 33.33 |"
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
                     "--gen_kwargs", "max_gen_toks=2", "--metadata", json.dumps(metadata),
                     "--row", "Training-free block", "hf-block",
                     f"pretrained={tiny_qwen3},sink_token=<|endoftext|>", "block"])
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [(r["label"], r["form"]) for r in saved["rows"]] == [("Training-free block", "block")]
    for i, row in enumerate(saved["rows"]):
        raw = json.loads((tmp_path / "out" / f"row{i}_results.json").read_text())
        suffix = "_block" if row["form"] == "block" else ""
        assert row["scores"]["Avg"] == round(100 * raw["locomo" + suffix]["score,none"], 2)
        assert row["scores"]["Temporal"] == round(100 * raw["locomo_temporal" + suffix]["score,none"], 2)
    assert len(table.splitlines()) == 3
