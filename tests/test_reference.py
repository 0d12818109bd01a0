"""Reference semantics: the mask form equals the cache form (encode alone + rotate), and both differ
from full attention; a block reused at another offset or in another order gives the same result."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_blockattn.core.layout import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.core.reference import (
    block_attention_mask,
    block_forward,
    block_forward_cached,
    encode_block,
    full_forward,
    rope_inv_freq,
    rotate_keys,
)

DOCS = [
    "Alice moved to Paris in 2019 and works as a nurse.",
    "Bob collects stamps from 42 countries.",
    "The river flows past the old mill.",
]
QUESTION = "Question: Where does Alice live? Answer:"


def _load(path, attn="eager"):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["tiny_qwen3", "tiny_llama"])
def model_and_tok(request):
    path = request.getfixturevalue(request.param)
    return _load(path), AutoTokenizer.from_pretrained(path), BlockSettings.from_pretrained(path)


def _prompt(tok, settings, docs, prefix="<|im_start|>user\n", page=None):
    kwargs = {"page_size": page, "pad_id": tok.pad_token_id} if page else {}
    ids = build_block_prompt(docs + [QUESTION], settings, tokenizer=tok, prefix=prefix, **kwargs)
    return ids, parse_block_prompt(ids, settings, **kwargs)


def test_mask_pattern_small_case():
    s = BlockSettings(sink_token_id=3, num_sinks=1)
    layout = parse_block_prompt([3, 10, 11, 3, 12, 3, 13, 14], s)
    allowed = (block_attention_mask(layout)[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],  # block 2 does not see block 1
        [0, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],  # the final block sees everything before it
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]
    assert block_attention_mask(layout).dtype == torch.float32  # additive, never bool


def test_mask_form_equals_cache_form_and_differs_from_full(model_and_tok):
    model, tok, s = model_and_tok
    ids, layout = _prompt(tok, s, DOCS)
    fs = layout.final.start
    masked = block_forward(model, ids, layout)[fs:]
    cached = block_forward_cached(model, ids, layout)
    full = full_forward(model, ids)[fs:]
    assert (masked - cached).abs().max().item() <= 1e-4
    assert (masked - full).abs().max().item() > 1e-2  # block attention is not full attention here
    # Context-block rows equal each block encoded alone from position 0 (RoPE is relative).
    blk = layout.blocks[2]
    alone = full_forward(model, ids[blk.start:blk.end])
    assert (block_forward(model, ids, layout)[blk.start:blk.end] - alone).abs().max().item() <= 1e-4


def test_sdpa_and_eager_agree_on_the_float_mask(tiny_qwen3):
    tok, s = AutoTokenizer.from_pretrained(tiny_qwen3), BlockSettings.from_pretrained(tiny_qwen3)
    ids, layout = _prompt(tok, s, DOCS)
    a = block_forward(_load(tiny_qwen3, "eager"), ids, layout)
    b = block_forward(_load(tiny_qwen3, "sdpa"), ids, layout)
    assert (a - b).abs().max().item() <= 1e-4


def test_padding_changes_nothing(model_and_tok):
    model, tok, s = model_and_tok
    ids, layout = _prompt(tok, s, DOCS)
    pids, playout = _prompt(tok, s, DOCS, page=32)
    assert len(pids) > len(ids)
    a = block_forward(model, ids, layout)[layout.final.start:]
    b = block_forward(model, pids, playout)[playout.final.start:]
    assert (a - b).abs().max().item() <= 1e-4


def test_block_reused_at_other_offset_and_order(model_and_tok):
    model, tok, s = model_and_tok
    ids, layout = _prompt(tok, s, DOCS)
    # Encode doc 0 in a different prompt where it sits at another offset, then reuse its KV here.
    other_ids, other_layout = _prompt(tok, s, [DOCS[2], DOCS[1], DOCS[0]], prefix="A longer different prefix\n")
    src = other_layout.blocks[3]
    assert other_layout.offsets()[3] != layout.offsets()[1]
    reused = {1: encode_block(model, other_ids[src.start:src.end])}
    in_place = block_forward_cached(model, ids, layout)
    with_reuse = block_forward_cached(model, ids, layout, block_kv=reused)
    assert (in_place - with_reuse).abs().max().item() <= 1e-5
    # And every context block taken from other prompts (another order, other offsets) at once.
    donors = {b: encode_block(model, other_ids[blk.start:blk.end])
              for b, blk in zip([3, 2, 1], other_layout.blocks[1:4])}
    assert (in_place - block_forward_cached(model, ids, layout, block_kv=donors)).abs().max().item() <= 1e-5


def test_rotation_composes():
    torch.manual_seed(0)
    inv = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    k = torch.randn(2, 5, 32)
    assert torch.allclose(rotate_keys(rotate_keys(k, 7, inv), 5, inv), rotate_keys(k, 12, inv), atol=1e-5)
    assert torch.allclose(rotate_keys(rotate_keys(k, 9, inv), -9, inv), k, atol=1e-5)


def test_unsupported_rope_is_refused(tmp_path):
    from vllm_blockattn.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "yarn", "qwen3", rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                                        "original_max_position_embeddings": 64})
    with pytest.raises(NotImplementedError, match="rope_type 'yarn' is not supported"):
        rope_inv_freq(_load(path))


def test_sink_free_layout_removes_boundaries_before_attention(model_and_tok):
    """Sink-free layout (num_sinks=0): the boundary token is invisible. The mask form equals the cache
    form, a context block equals its content encoded alone, and with the head as the only context the
    final block equals full attention over the prompt with the boundary deleted."""
    model, tok, s = model_and_tok
    free = BlockSettings(num_sinks=0, boundary_token_id=s.sink_token_id)  # a special token, never in text
    ids, layout = _prompt(tok, free, DOCS)
    fs = layout.final.start
    masked = block_forward(model, ids, layout)
    assert (masked[fs:] - block_forward_cached(model, ids, layout)).abs().max().item() <= 1e-4
    blk = layout.blocks[2]
    assert ids[blk.start - 1] == free.boundary_token_id
    alone = full_forward(model, ids[blk.start:blk.end])
    assert (masked[blk.start:blk.end] - alone).abs().max().item() <= 1e-4
    # A prompt whose only context is the head: block attention equals full attention without boundaries.
    head = tok.encode("<|im_start|>user\n", add_special_tokens=False)
    q = tok.encode(QUESTION, add_special_tokens=False)
    ids1 = head + [free.boundary_token_id] + q
    layout1 = parse_block_prompt(ids1, free)
    plain = full_forward(model, head + q)
    got = block_forward(model, ids1, layout1)[layout1.real_token_indices()]
    assert (got - plain).abs().max().item() <= 1e-4
