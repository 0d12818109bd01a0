"""train/ablation_study.py: the --quick path end to end (teacher, every arm, raw JSONL, resume, summary, table)
and the paired bootstrap on cases with a known answer."""

import importlib.util
import json
import os

import numpy as np
import pytest

from vllm_blockattn.distill.ablation_stats import mean_interval, paired_bootstrap
from vllm_blockattn.distill.ablation_task import make_profile_records


def _study():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "ablation_study.py")
    spec = importlib.util.spec_from_file_location("_ablation_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bootstrap_constant_difference_is_exact():
    """Arms that differ by exactly 0.1 on every question of every unit, whatever the unit's own level: the
    paired interval is the point [0.1, 0.1] (an unpaired one would be wide)."""
    rng = np.random.default_rng(0)
    ref = {(t, s): rng.normal(size=30) + 5 * s for t in (0, 1) for s in range(5)}
    arm = {u: v + 0.1 for u, v in ref.items()}
    out = paired_bootstrap(arm, ref, reps=300)
    assert out["diff"] == pytest.approx(0.1) and out["lo"] == pytest.approx(0.1) and out["hi"] == pytest.approx(0.1)
    assert out["n_units"] == 10 and out["n_teachers"] == 2 and out["n_questions"] == 60


def test_bootstrap_matches_the_normal_interval_of_a_mean():
    """400 units of one question each, differences ~ N(0.3, 1): the interval is mean +- 1.96 / sqrt(400)."""
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, size=400)
    arm = {(0, i): [x] for i, x in enumerate(d)}
    ref = {(0, i): [0.0] for i in range(400)}
    out = paired_bootstrap(arm, ref, reps=4000, seed=2)
    half = 1.96 * d.std(ddof=1) / np.sqrt(400)
    assert out["diff"] == pytest.approx(d.mean())
    assert out["lo"] == pytest.approx(d.mean() - half, abs=0.015)
    assert out["hi"] == pytest.approx(d.mean() + half, abs=0.015)
    m = mean_interval(arm, reps=4000, seed=2)
    assert (m["mean"], m["lo"], m["hi"]) == pytest.approx((out["diff"], out["lo"], out["hi"]))


def test_bootstrap_uses_shared_units_only():
    out = paired_bootstrap({(0, 0): [1.0], (0, 1): [1.0]}, {(0, 1): [0.0], (0, 2): [0.0]}, reps=10)
    assert out["n_units"] == 1 and out["diff"] == 1.0
    assert paired_bootstrap({(0, 0): [1.0]}, {(1, 0): [1.0]})["diff"] is None


def test_profile_task_update_wins():
    recs = make_profile_records(200, num_docs=6, updates=1.0, seed=3)
    for r in recs:
        a1, a2, _ = r["question"].split()
        words = r["answer"].split()
        assert words[0] == a1 and words[3] == a2 and a1 != a2 and r["updated"]
        stated = [d.split()[1] for d in r["context"] if d.split()[0] == a1]
        assert len(stated) == 2 and stated[0] != stated[1] and words[1] == stated[1]  # the latest statement wins
        assert [d.split()[1] for d in r["context"] if d.split()[0] == a2] == [words[4]]
    assert not any(r["updated"] for r in make_profile_records(50, updates=0.0))


def test_quick_run_end_to_end(tmp_path):
    study = _study()
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--out", str(out), "--quick", "--work-dir", str(work), "--student-seeds", "0", "1"]
    study.main(argv)
    runs = [json.loads(ln) for ln in (out / "runs.jsonl").read_text().splitlines()]
    teachers = [r for r in runs if r["kind"] == "teacher"]
    students = [r for r in runs if r["kind"] == "student"]
    main_runs = [r for r in students if r["condition"] == "main"]
    low = [r for r in students if r["condition"] == "low_data"]
    assert len(teachers) == 1 and len(main_runs) == 2 * len(study.DEFAULT_ARMS) and len(low) == 2 * 2
    n_eval = len(teachers[0]["updated"])
    for r in students:
        for view in ("block", "full", "full_sinks"):
            m = r["metrics"][view]
            assert len(m["em"]) == len(m["nll"]) == len(m["kl"]) == n_eval
        assert r["curve"][0][0] == 0 and r["curve"][-1][0] == r["steps"]
    assert len(teachers[0]["bos_attention"]) == 2  # [layers][heads]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["command"].endswith(" ".join(argv)) and summary["provenance"]["cpu"]
    main = summary["conditions"]["main"]
    assert set(main["arms"]) == {"teacher", *study.DEFAULT_ARMS}
    assert set(summary["conditions"]["low_data"]["arms"]) == {"teacher", "full", "block_ft"}
    diff = main["arms"]["block_ft"]["metrics"]["block_em"]["minus_full"]
    assert diff["n_units"] == 2 and diff["lo"] <= diff["diff"] <= diff["hi"]
    table = (out / "table.md").read_text()
    assert "Block-FT" in table and "w/o sinks" in table and "(arm minus full" in table
    rows = [ln.replace("\\|", "") for ln in table.splitlines() if ln.startswith("| ")]
    assert all(ln.count("|") == rows[0].count("|") for ln in rows[:8])  # no unescaped pipes in the cells
    # a rerun skips what runs.jsonl already holds
    study.main(argv)
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(runs)


def test_quick_prose_lm_recipe(tmp_path):
    """--teacher-recipe prose-lm on the synthetic prose stand-in: the teacher trains on prose windows too (its
    curve logs the prose loss, block EM without sinks and the BOS attention), the vocabulary holds the task's
    words plus prose words, the recipe is recorded, and every arm's student runs."""
    from vllm_blockattn.distill.ablation_task import prose_vocabulary, prose_words, synthetic_prose, vocabulary

    study = _study()
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--out", str(out), "--quick", "--work-dir", str(work), "--teacher-recipe", "prose-lm",
            "--prose-dir", "synthetic", "--student-seeds", "0"]
    study.main(argv)
    runs = [json.loads(ln) for ln in (out / "runs.jsonl").read_text().splitlines()]
    (teacher,) = [r for r in runs if r["kind"] == "teacher"]
    assert teacher["recipe"]["teacher_recipe"] == "prose-lm" and teacher["recipe"]["prose_len"] == 16
    assert teacher["prose"]["source"].startswith("synthetic") and teacher["prose"]["tokens"] > 1000
    assert all(len(c) == 7 for c in teacher["curve"]) and teacher["final_prose_loss"] > 0
    assert 0 <= teacher["curve"][-1][5] <= 1  # max head's BOS attention mass
    assert len(teacher["bos_attention_prose"]) == 2 and "On held-out prose" in (out / "table.md").read_text()
    words = prose_words(synthetic_prose())
    vocab = prose_vocabulary(words, 50)  # the stand-in has 45 words outside the task's vocabulary
    assert vocab[: len(vocabulary())] == vocabulary() and len(vocab) == len(set(vocab)) == len(vocabulary()) + 45
    assert len(prose_vocabulary(words, 10)) == len(vocabulary()) + 10
    assert teacher["prose"]["vocab_size"] == len(vocab)
    assert len([r for r in runs if r["kind"] == "student" and r["condition"] == "main"]) == len(study.DEFAULT_ARMS)
    # the old recipe's teacher dict has no prose keys, so saved task-lm teachers still load
    assert "teacher_recipe" not in study.teacher_recipe(study.parse_args(["--out", str(out)]))


def test_prose_words_split_punctuation():
    from vllm_blockattn.distill.ablation_task import prose_words

    assert prose_words('"It is," said Emma; don\'t.') == ['"', "it", "is", ",", '"', "said", "emma", ";", "don",
                                                         "'", "t", "."]


def test_first_token_attention_ids_matches_the_task_measurement():
    """On one unpadded task sequence, the raw-ids measurement equals the collated one (same heads, same mass)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_blockattn.distill.ablation_task import first_token_attention, first_token_attention_ids
    from vllm_blockattn.tiny import build_config

    study = _study()
    task = study.Task(study.parse_args(["--out", "/unused", "--quick"]))
    torch.manual_seed(0)
    config = build_config("qwen3", vocab_size=len(task.tokenizer) + 1, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, eos_token_id=task.tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    (sample,) = task.samples(task.records(1, seed=0), sinks=False)
    batch = task.collator([sample])
    ids = batch["full_input_ids"][:, : int(batch["content_index"].max()) + 1]
    a = first_token_attention(model, [sample], task.collator)
    b = first_token_attention_ids(model, ids)
    assert a.shape == b.shape == (2, 4) and torch.allclose(a, b, atol=1e-5) and (b > 0).all() and (b < 1).all()
