"""The ``hf-block`` lm-eval model equals the reference semantics (mask-form oracle)."""

import pytest
import torch
from lm_eval.api.instance import Instance

from vllm_blockattn.eval.hf_block import HFBlockLM, resolve_settings
from vllm_blockattn.core.layout import BlockSettings, build_block_text, parse_block_prompt
from vllm_blockattn.core.reference import block_forward, block_generate, full_forward

BLOCKS = [
    "The lighthouse keeper counted ships every night by the harbour.\n",
    "A red kite circled above the wheat fields near the old mill.\n",
    "Question: what did the keeper count? Answer:",
]


@pytest.fixture(scope="module")
def lm(tiny_qwen3):
    return HFBlockLM(pretrained=tiny_qwen3)


def test_settings_resolution(lm, tiny_qwen3, monkeypatch):
    assert lm.settings == BlockSettings(3, 4)  # config.json block_attention of the tiny model
    assert resolve_settings(lm.tokenizer, tiny_qwen3, "<|endoftext|>", 2) == BlockSettings(0, 2)
    monkeypatch.setenv("BLOCKATTN_SINK_TOKEN", "<|im_end|>")
    assert resolve_settings(lm.tokenizer, tiny_qwen3).sink_token_id == lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match="one token"):
        resolve_settings(lm.tokenizer, tiny_qwen3, "two words")


def test_prefill_matches_mask_form_and_differs_from_full(lm):
    ids = lm.tok_encode(build_block_text(BLOCKS))
    layout = parse_block_prompt(ids, lm.settings)
    n_final = layout.final.num_tokens
    logits, _, start = lm.prefill(ids, keep=n_final)
    oracle = block_forward(lm.model, ids, layout)[start:]
    torch.testing.assert_close(logits, oracle, atol=2e-4, rtol=1e-4)
    # the tiny model is sharp enough for the mask to matter here
    assert (full_forward(lm.model, ids)[start:] - oracle).abs().max() > 1e-2


def test_generation_matches_reference_block_generate(lm):
    for text in (build_block_text(BLOCKS), lm.apply_chat_template([{"role": "user", "content": build_block_text(BLOCKS)}])):
        ids = lm.tok_encode(text)
        layout = parse_block_prompt(ids, lm.settings)
        assert layout.is_block_prompt
        want = block_generate(lm.model, ids, layout, max_new_tokens=8)
        assert lm.greedy(ids, 8, stop_ids=set(), until=[]) == want
    full_ids = lm.tok_encode("".join(BLOCKS))
    assert lm.layout(full_ids) is None  # no sink group: stock causal attention


def test_generate_until_and_loglikelihood(lm):
    prompt = build_block_text(BLOCKS)
    ids = lm.tok_encode(prompt)
    layout = parse_block_prompt(ids, lm.settings)
    want = lm.tokenizer.decode(block_generate(lm.model, ids, layout, max_new_tokens=6), skip_special_tokens=True)
    req = Instance("generate_until", {}, (prompt, {"max_gen_toks": 6, "until": []}), 0)
    assert lm.generate_until([req], disable_tqdm=True) == [want]

    cont = lm.tok_encode(" the ships")
    all_ids = ids + cont
    logp = torch.log_softmax(block_forward(lm.model, all_ids, parse_block_prompt(all_ids, lm.settings)), -1)
    expected = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(cont))
    (ll, _), = lm._loglikelihood_tokens([(None, ids, cont)], disable_tqdm=True)
    assert ll == pytest.approx(expected, abs=1e-3)


def test_rejects_bad_args(tiny_qwen3):
    with pytest.raises(ValueError, match="batch_size must be 1"):
        HFBlockLM(pretrained=tiny_qwen3, batch_size=8)
    with pytest.raises(ValueError, match="unknown model_args"):
        HFBlockLM(pretrained=tiny_qwen3, temperature=0.5)
    short = HFBlockLM(pretrained=tiny_qwen3, max_model_len=16)
    with pytest.raises(ValueError, match="exceeds max_model_len 16"):
        short.prefill(short.tok_encode(build_block_text(BLOCKS)))


def test_sink_free_checkpoint_matches_the_reference(tiny_sinkfree):
    """hf-block on a checkpoint trained without sinks (config.json num_sinks 0): boundary tokens mark the
    blocks and take no part in attention, exactly as the reference and the vLLM plugin treat them."""
    from vllm_blockattn.core.layout import BOUNDARY_TOKEN

    lm = HFBlockLM(pretrained=tiny_sinkfree)
    assert lm.settings.sink_free
    assert resolve_settings(lm.tokenizer, tiny_sinkfree, BOUNDARY_TOKEN, 0) == lm.settings
    text = build_block_text(BLOCKS, BOUNDARY_TOKEN, 0)
    for prompt in (text, lm.apply_chat_template([{"role": "user", "content": text}])):
        ids = lm.tok_encode(prompt)
        layout = parse_block_prompt(ids, lm.settings)
        assert layout.is_block_prompt and ids.count(lm.settings.boundary_token_id) == len(BLOCKS)
        logits, _, start = lm.prefill(ids, keep=layout.final.num_tokens)
        torch.testing.assert_close(logits, block_forward(lm.model, ids, layout)[start:], atol=2e-4, rtol=1e-4)
        assert lm.greedy(ids, 6, stop_ids=set(), until=[]) == block_generate(lm.model, ids, layout, max_new_tokens=6)
    # the question alone after its boundary: the boundary is dropped, the rest is plain causal attention
    q = lm.tok_encode(BLOCKS[-1])
    assert lm.greedy([lm.settings.boundary_token_id] + q, 4, stop_ids=set(), until=[]) == \
        lm.greedy(q, 4, stop_ids=set(), until=[])
