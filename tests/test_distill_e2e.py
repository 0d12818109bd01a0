"""End to end: `accelerate launch train/distill.py` on CPU for 2 steps; the checkpoint serves block prompts.

The checkpoint is a plain Hugging Face directory (tokenizer + config.json ``block_attention`` entry), so
other tests (e.g. the vLLM plugin's) can reuse :func:`distilled_checkpoint`.
"""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "train", "configs", "tiny_cpu.yaml")


def distilled_checkpoint(out_dir: str, max_steps: int = 2) -> str:
    """Run the tiny CPU config through ``accelerate launch`` into ``out_dir``; return ``out_dir``."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", os.path.join(REPO, "train", "distill.py"), "--config", TINY_CONFIG,
           "--output_dir", out_dir, "--max_steps", str(max_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"distill.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return distilled_checkpoint(str(tmp_path_factory.mktemp("distilled")))


def test_checkpoint_is_plain_hf_with_block_config(checkpoint):
    from transformers import AutoTokenizer

    from vllm_blockattn.core.layout import SINK_TOKEN, BlockSettings

    settings = BlockSettings.from_pretrained(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert settings.num_sinks == 4
    assert tok.convert_tokens_to_ids(SINK_TOKEN) == settings.sink_token_id
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(os.path.join(checkpoint, name)), name


def test_checkpoint_trained_and_generates_under_block_attention(checkpoint):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.distill.data import ChatBlockFormatter, make_retrieval_records
    from vllm_blockattn.core.layout import BlockSettings, parse_block_prompt
    from vllm_blockattn.core.reference import block_forward, block_forward_cached, block_generate

    base = load_file(os.path.join(checkpoint, "base", "model.safetensors"))
    tuned = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert any(not torch.equal(base[k], tuned[k]) for k in base), "2 training steps changed no weight"

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    settings = BlockSettings.from_pretrained(checkpoint)
    ids = ChatBlockFormatter(tok, settings).prompt_ids(make_retrieval_records(1, seed=7)[0])
    layout = parse_block_prompt(ids, settings)
    assert len(layout.context_blocks) == 5  # chat head + 4 documents
    # Mask form and cache form agree on the trained checkpoint (both are the reference semantics).
    final = layout.final
    assert torch.allclose(block_forward(model, ids, layout)[final.start:final.end],
                          block_forward_cached(model, ids, layout), atol=1e-4)
    out = block_generate(model, ids, layout, max_new_tokens=4)
    assert len(out) == 4 and all(0 <= t < len(tok) for t in out)


def test_plain_python_lora_run_merges_and_trains_only_the_sink_row(tmp_path):
    """`python train/distill.py ... --use_peft`: LoRA merged into a plain checkpoint; of the embedding
    matrix only the sink row moved (PEFT's trainable-token adapter)."""
    from safetensors.torch import load_file

    from vllm_blockattn.core.layout import BlockSettings

    out = str(tmp_path / "lora")
    cmd = [sys.executable, os.path.join(REPO, "train", "distill.py"), "--config", TINY_CONFIG, "--output_dir", out,
           "--max_steps", "2", "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = BlockSettings.from_pretrained(out)
    base = load_file(os.path.join(out, "base", "model.safetensors"))
    tuned = load_file(os.path.join(out, "model.safetensors"))
    assert set(base) == set(tuned)  # merged: no adapter keys left
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert "model.embed_tokens.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.layers.0.mlp.up_proj.weight" not in changed
    moved = (base["model.embed_tokens.weight"] != tuned["model.embed_tokens.weight"]).any(dim=1)
    assert moved.nonzero().flatten().tolist() == [settings.sink_token_id]


def test_vllm_plugin_serves_the_checkpoint_in_block_mode(checkpoint):
    """The distilled directory needs no settings beyond the backend name: vLLM's greedy tokens on a block
    prompt equal the HF reference's block-attention generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_blockattn.distill.data import ChatBlockFormatter, make_retrieval_records
    from vllm_blockattn.core.layout import BlockSettings, parse_block_prompt
    from vllm_blockattn.core.reference import block_forward, block_generate, full_forward

    tok = AutoTokenizer.from_pretrained(checkpoint)
    settings = BlockSettings.from_pretrained(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = ChatBlockFormatter(tok, settings).prompt_ids(make_retrieval_records(1, seed=7)[0])
    layout = parse_block_prompt(ids, settings)
    # Block attention changes this model's outputs, so matching the block reference means something.
    assert (block_forward(hf, ids, layout)[-1] - full_forward(hf, ids)[-1]).abs().max() > 1e-3
    ref = block_generate(hf, ids, layout, max_new_tokens=8)
    llm = LLM(model=checkpoint, attention_backend="blockattn", dtype="float32", enforce_eager=True,
              max_model_len=2048, seed=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert list(out[0].outputs[0].token_ids) == ref
