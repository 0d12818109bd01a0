"""The whole recipe on CPU at tiny scale, one command per stage as a user runs them:
prepare data (train/prepare_data.py) -> distill (accelerate launch train/distill.py, held-out eval) ->
evaluate with the task pack (lm-eval, hf-block) -> serve with vLLM's `blockattn` attention backend."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_prepare_distill_evaluate_serve(tmp_path):
    import torch

    # 1. data: a HotpotQA-format file (official layout) -> trainer jsonl + held-out split
    recs = [{"_id": str(i), "question": f"what does person{i % 7} own ?", "answer": f"item{i % 5}",
             "context": [[f"Person{i % 7}", [f"person{i % 7} owns item{i % 5} ."]],
                         [f"Filler{i}", [f"the weather on day {i} was mild ."]]]} for i in range(40)]
    (tmp_path / "hotpot.json").write_text(json.dumps(recs))
    data = tmp_path / "data"
    _run([sys.executable, "train/prepare_data.py", "hotpotqa", "--input", str(tmp_path / "hotpot.json"),
          "--out", str(data / "train.jsonl"), "--eval-out", str(data / "eval.jsonl"), "--eval-size", "8",
          "--segmenter", "paragraphs"])
    # 2. distill (tiny model built on the fly), evaluating on the held-out split
    out = str(tmp_path / "ckpt")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run([accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "train/distill.py", "--config", "train/configs/tiny_cpu.yaml",
          "--output_dir", out, "--dataset_name", str(data / "train.jsonl"),
          "--eval_dataset_name", str(data / "eval.jsonl"), "--max_steps", "3", "--eval_strategy", "steps",
          "--eval_steps", "3"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval_block_accuracy" in r]
    assert evals and 0.0 <= evals[-1]["eval_block_accuracy"] <= 1.0
    # 3. evaluate the checkpoint with the task pack (block form of a LongBench task from local fixtures)
    from vllm_blockattn.eval.__main__ import prepare

    prepare()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=os.path.join(REPO, "eval", "tasks"), include_defaults=False,
                     metadata={"pretrained": out, "longbench_dir": os.path.join(REPO, "tests", "fixtures", "longbench"),
                               "max_length": 512})
    res = lm_eval.simple_evaluate(model="hf-block", model_args={"pretrained": out},
                                  tasks=["longbench_hotpotqa_block"], limit=1, task_manager=tm,
                                  gen_kwargs="max_gen_toks=4")
    assert 0.0 <= res["results"]["longbench_hotpotqa_block"]["score,none"] <= 1.0
    # 4. serve it with the plugin's backend: greedy tokens equal the HF block reference
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_blockattn.distill.data import ChatBlockFormatter, load_records
    from vllm_blockattn.core.layout import BlockSettings, parse_block_prompt
    from vllm_blockattn.core.reference import block_generate

    tok = AutoTokenizer.from_pretrained(out)
    settings = BlockSettings.from_pretrained(out)
    ids = ChatBlockFormatter(tok, settings).prompt_ids(load_records(data / "eval.jsonl")[0])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = block_generate(hf, ids, parse_block_prompt(ids, settings), max_new_tokens=6)
    llm = LLM(model=out, attention_backend="blockattn", dtype="float32", enforce_eager=True, max_model_len=2048,
              seed=0)
    got = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert list(got[0].outputs[0].token_ids) == ref
