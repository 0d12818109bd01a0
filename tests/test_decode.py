"""Decode regression guard (behaviour, not time): 64 greedy tokens of batches that mix block and ordinary
requests equal the reference token for token, with log-probabilities within 1e-3, on the native CPU
final-block kernel and on the torch fallback."""

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_blockattn import BlockSettings, build_block_prompt

from tests._reference import assert_matches, block_reference

vllm = pytest.importorskip("vllm")

NEW = 64


def prompts(path):
    settings = BlockSettings.from_pretrained(path)
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(10, 400, (n,), generator=g).tolist()

    return [
        build_block_prompt([ids(70), ids(31), ids(64), ids(20)], settings, prefix=ids(9)),
        ids(150),  # ordinary
        build_block_prompt([ids(33), ids(40)], settings),
        ids(37),  # ordinary
        build_block_prompt([ids(64), ids(5)], settings),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_decode_64_tokens_mixed_batch_equals_reference(tiny_qwen3, kernel, monkeypatch):
    from vllm import LLM, SamplingParams

    if kernel == "torch":
        monkeypatch.setenv("VLLM_BLOCKATTN_CPU_KERNEL", "0")
        import vllm_blockattn.worker.cpu_kernels as ck

        monkeypatch.setattr(ck, "_MODULE", None)
    batch = prompts(tiny_qwen3)
    llm = LLM(model=tiny_qwen3, attention_backend="blockattn", dtype="float32", enforce_eager=True,
              max_model_len=1024, seed=0)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                            SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=0, ignore_eos=True),
                            use_tqdm=False)
    finally:
        del llm
        gc.collect()
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    settings = BlockSettings.from_pretrained(tiny_qwen3)
    for p, out in zip(batch, outs):
        assert_matches(out, block_reference(model, settings, p, NEW))
