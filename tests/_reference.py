"""Shared by the engine tests: the HF block reference of a prompt and the comparison of a vLLM output
with it (greedy tokens identical, chosen-token log-probabilities within 1e-3)."""

from vllm_blockattn import parse_block_prompt
from vllm_blockattn.core.reference import block_generate


def load_hf(path):
    """(model, tokenizer, block settings) of a checkpoint, fp32 eval: the reference side of a test."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn import BlockSettings

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), BlockSettings.from_pretrained(path)


def block_reference(model, settings, ids, max_tokens):
    """Greedy tokens and their log-probabilities under block attention (plain causal without sinks)."""
    return block_generate(model, ids, parse_block_prompt(ids, settings), max_new_tokens=max_tokens,
                          return_logprobs=True)


def assert_matches(output, ref, tol=1e-3):
    tokens, lps = ref
    got = list(output.outputs[0].token_ids)
    assert got == tokens
    got_lps = [step[t].logprob for step, t in zip(output.outputs[0].logprobs, got)]
    assert max(abs(a - b) for a, b in zip(got_lps, lps)) <= tol
