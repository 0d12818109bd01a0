"""The recipe: public formats -> trainer jsonl (segmentation cached), then train/distill.py with a held-out
eval set, metrics logging and resumption."""

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_train_{name}", os.path.join(REPO, "train", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def blank_line_segmenter(text):
    """A user segmenter given as ``module:function`` (``test_distill_recipe:blank_line_segmenter``)."""
    return [p + "\n\n" for p in text.split("\n\n") if p.strip()]


def _hotpot(n, seed=0):
    out = []
    for i in range(n):
        out.append({"_id": f"h{i}", "question": f"where does person{i} live ?", "answer": f"city{i}",
                    "context": [[f"Person{i}", [f"person{i} lives in city{i} .", " it is big ."]],
                                [f"Other{i}", [f"other{i} lives in town{i} ."]]],
                    "supporting_facts": [[f"Person{i}", 0]], "type": "bridge", "level": "easy"})
    return out


def test_prepare_data_formats_and_segment_cache(tmp_path, monkeypatch):
    prep = _script("prepare_data")
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    # HotpotQA and 2WikiMultiHopQA: official JSON lists; one paragraph = one block
    for fmt in ("hotpotqa", "2wikimultihopqa"):
        src = tmp_path / f"{fmt}.json"
        src.write_text(json.dumps(_hotpot(10)))
        stats = prep.main([fmt, "--input", str(src), "--out", str(tmp_path / f"{fmt}.jsonl"), "--eval-out",
                           str(tmp_path / f"{fmt}_eval.jsonl"), "--eval-size", "3", "--segmenter", "paragraphs"])
        assert stats["train"] == 7 and stats["eval"] == 3
        train, held = _jsonl(tmp_path / f"{fmt}.jsonl"), _jsonl(tmp_path / f"{fmt}_eval.jsonl")
        assert {r["question"] for r in train}.isdisjoint({r["question"] for r in held})
        r = train[0]
        assert len(r["context"]) == 2 and r["context"][0].startswith("Person") and r["answer"].startswith("city")
    # TriviaQA official RC layout with an evidence folder, and the HF layout
    ev = tmp_path / "evidence"
    (ev / "wikipedia").mkdir(parents=True)
    (ev / "wikipedia" / "Paris.txt").write_text("Paris is the capital of France.\n\nIt has the Louvre.\n\nMore.")
    (tmp_path / "trivia.json").write_text(json.dumps({"Data": [
        {"Question": "capital of france ?", "Answer": {"Value": "Paris", "Aliases": ["paris"]},
         "EntityPages": [{"Filename": "Paris.txt", "Title": "Paris"}], "SearchResults": []}]}))
    seg = "test_distill_recipe:blank_line_segmenter"
    stats = prep.main(["triviaqa", "--input", str(tmp_path / "trivia.json"), "--out", str(tmp_path / "tq.jsonl"),
               "--evidence-dir", str(ev), "--segmenter", seg])
    (rec,) = _jsonl(tmp_path / "tq.jsonl")
    assert rec["context"] == ["Paris is the capital of France.\n\n", "It has the Louvre.\n\n", "More.\n\n"]
    assert rec["answer"] == "Paris" and stats["segmented"] == 1
    (tmp_path / "trivia_hf.jsonl").write_text(json.dumps(
        {"question": "q ?", "answer": {"value": "v", "aliases": []}, "entity_pages": {"wiki_context": ["a\n\nb"]},
         "search_results": {"search_context": ["c"]}}) + "\n")
    prep.main(["triviaqa", "--input", str(tmp_path / "trivia_hf.jsonl"), "--out", str(tmp_path / "tq2.jsonl"),
               "--segmenter", seg])
    assert _jsonl(tmp_path / "tq2.jsonl")[0]["context"] == ["a\n\n", "b\n\n", "c\n\n"]
    # ChatQA2-style conversations; the segmentation cache: a rerun segments nothing
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "what is x ?"}, {"role": "assistant", "content": "x is 1"}],
            "document": "x is 1 .\n\ny is 2 ."}
    (tmp_path / "chat.jsonl").write_text(json.dumps(conv) + "\n")
    out = str(tmp_path / "not_yet" / "chat_out.jsonl")  # the output folder (and cache) created on the way
    s1 = prep.main(["chatqa2", "--input", str(tmp_path / "chat.jsonl"), "--out", out, "--segmenter", seg])
    s2 = prep.main(["chatqa2", "--input", str(tmp_path / "chat.jsonl"), "--out", out, "--segmenter", seg])
    assert (s1["segmented"], s2["segmented"], s2["cache_hits"]) == (1, 0, 1)
    assert os.path.exists(out + ".segments.jsonl")
    (rec,) = _jsonl(out)
    assert rec == {"context": ["x is 1 .\n\n", "y is 2 .\n\n"], "question": "User: hi\nAssistant: hello\nwhat is x ?",
                   "answer": "x is 1"}
    # The trainer reads every prepared file.
    from vllm_blockattn.distill.data import load_records

    assert len(load_records(tmp_path / "hotpotqa.jsonl")) == 7 and load_records(out)[0]["answer"] == "x is 1"
    # errors name the record
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "context": [["t", ["s"]]]}]))
    with pytest.raises(ValueError, match=r"bad.json\[0\].*answer"):
        prep.main(["hotpotqa", "--input", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.jsonl"),
                   "--segmenter", "paragraphs"])


def _run_distill(argv):
    from trl import ModelConfig, TrlParser

    from vllm_blockattn.distill import BlockDistillationConfig

    mod = _script("distill")
    parser = TrlParser((mod.DistillScriptArguments, BlockDistillationConfig, ModelConfig))
    return mod.main(*parser.parse_args_and_config(args=argv))


def test_distill_script_eval_logging_and_resume(tmp_path):
    prep = _script("prepare_data")
    (tmp_path / "hotpot.json").write_text(json.dumps(_hotpot(12)))
    prep.main(["hotpotqa", "--input", str(tmp_path / "hotpot.json"), "--out", str(tmp_path / "train.jsonl"),
               "--eval-out", str(tmp_path / "eval.jsonl"), "--eval-size", "4", "--segmenter", "paragraphs"])
    out = str(tmp_path / "run")
    common = ["--config", os.path.join(REPO, "train", "configs", "tiny_cpu.yaml"), "--output_dir", out,
              "--dataset_name", str(tmp_path / "train.jsonl"), "--eval_dataset_name", str(tmp_path / "eval.jsonl"),
              "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
              "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
              "--report_to", "tensorboard"]  # not installed here: dropped with a warning, metrics.jsonl stays
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        _run_distill(common + ["--max_steps", "2"])
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))
    logs = _jsonl(os.path.join(out, "metrics.jsonl"))
    evals = [x for x in logs if "eval_loss" in x]
    assert evals and evals[0]["step"] == 2
    for key in ("eval_block_accuracy", "eval_full_accuracy", "eval_block_kl", "eval_ce", "eval_kl"):
        assert key in evals[0], key
    assert 0.0 <= evals[0]["eval_block_accuracy"] <= 1.0 and evals[0]["eval_block_kl"] >= 0.0
    train_steps = [x["step"] for x in logs if "loss" in x]
    assert train_steps == [1, 2]
    # resume: continues from checkpoint-2 (steps 1-2 are not run again)
    _run_distill(common + ["--max_steps", "3", "--resume_from_checkpoint", "true"])
    logs = _jsonl(os.path.join(out, "metrics.jsonl"))
    assert [x["step"] for x in logs if "loss" in x] == [1, 2, 3]
    with open(os.path.join(out, "checkpoint-3", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 3


QWEN3_LIKE = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
              "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
              "{%- endif %}{%- endif %}")


@pytest.mark.parametrize("flag, think_open", [([], False), (["--enable_thinking", "true"], True)])
def test_distill_script_thinking_flag(tmp_path, monkeypatch, flag, think_open):
    """``enable_thinking`` (default off) reaches the training formatter: with a Qwen3-style template the turn
    switch before the labelled answer closes an empty think block, unless the flag turns thinking on."""
    import vllm_blockattn.distill.data as data

    real, seen = data.ChatBlockFormatter, {}

    class Stop(Exception):
        pass

    def spy(tokenizer, settings, **kw):
        tokenizer.chat_template = QWEN3_LIKE
        seen["kw"], seen["switch"] = kw, real(tokenizer, settings, **kw).turn_switch
        raise Stop  # formatting is all this test needs: no training

    monkeypatch.setattr(data, "ChatBlockFormatter", spy)
    with pytest.raises(Stop):
        _run_distill(["--config", os.path.join(REPO, "train", "configs", "tiny_cpu.yaml"),
                      "--output_dir", str(tmp_path / "run"), *flag])
    assert seen["kw"]["enable_thinking"] is think_open
    assert seen["switch"].endswith("<|im_start|>assistant\n" + ("" if think_open else "<think>\n\n</think>\n\n"))


@pytest.mark.parametrize("name", ["qwen3_4b_gpu", "qwen3_8b_gpu", "qwen3_14b_gpu", "llama3_8b_gpu"])
def test_gpu_configs_parse(name):
    """Every GPU config is read by train/distill.py's parser (unknown keys fail there), trains on the mix that
    train/configs/data_hotpotqa_chatqa2.yaml prepares, with thinking off."""
    from trl import ModelConfig, TrlParser

    from vllm_blockattn.distill import BlockDistillationConfig

    mod = _script("distill")
    parser = TrlParser((mod.DistillScriptArguments, BlockDistillationConfig, ModelConfig))
    script, train, model = parser.parse_args_and_config(
        args=["--config", os.path.join(REPO, "train", "configs", f"{name}.yaml"), "--bf16", "false"])
    assert script.dataset_name == "data/hotpotqa_chatqa2_train.jsonl" and script.enable_thinking is False
    assert script.eval_dataset_name == "data/hotpotqa_chatqa2_eval.jsonl"
    assert 0 < train.warmup_steps < 1 and train.gradient_checkpointing and model.use_peft
    if name == "qwen3_14b_gpu":
        assert model.model_name_or_path == "Qwen/Qwen3-14B" and train.gradient_accumulation_steps == 4


def test_distill_script_trains_on_the_mix(tmp_path):
    """A mixed file (HotpotQA + segmented ChatQA2-style) goes through train/distill.py with dataset_format auto."""
    prep = _script("prepare_data")
    (tmp_path / "hotpot.json").write_text(json.dumps(_hotpot(8)))
    conv = [{"messages": [{"role": "user", "content": f"what is x{i} ?"}, {"role": "assistant", "content": f"{i}"}],
             "document": f"x{i} is {i} .\n\ny{i} is {i + 1} ."} for i in range(8)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conv))
    stats = prep.main(["mix", "--source", "hotpotqa", str(tmp_path / "hotpot.json"), "--source", "chatqa2",
                       str(tmp_path / "chat.jsonl"), "--mix", "hotpotqa=1,chatqa2=1", "--size", "8",
                       "--out", str(tmp_path / "mix.jsonl"), "--segmenter", "paragraphs"])
    assert stats["sources"]["chatqa2"]["train"] == 4
    out = str(tmp_path / "run")
    _run_distill(["--config", os.path.join(REPO, "train", "configs", "tiny_cpu.yaml"), "--output_dir", out,
                  "--dataset_name", str(tmp_path / "mix.jsonl"), "--per_device_train_batch_size", "4",
                  "--max_steps", "2"])
    logs = _jsonl(os.path.join(out, "metrics.jsonl"))
    assert [x["step"] for x in logs if "loss" in x] == [1, 2]
