"""Shared pieces of the distillation memory/step-time benchmarks (train/bench_memory.py on CPU,
train/gpu_check_distill.py on a GPU): a random model of a given shape and one long block sample.

Nothing downloads: the tokenizer is the tiny offline one (:mod:`vllm_blockattn.tiny`), the model's vocabulary
is ``vocab_size`` (>= the tokenizer's; the extra rows are never input tokens but every logit row spans them).
"""

from __future__ import annotations

import random

import torch

from ..core.layout import BlockSettings, build_block_prompt

# Shapes of the benchmarks' random models (Qwen3 architecture).
SHAPES = {
    # CPU benchmark: small layers, a 32k vocabulary (the logits dominate, as in real models at long context)
    "cpu-32k": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768,
                    vocab_size=32768),
    # Qwen3-0.6B's shape (~0.6B parameters, 151,936-token vocabulary)
    "qwen3-0.6b": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936),
    # a small model for quick correctness checks
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
                 vocab_size=4096),
}


def random_model(shape: str | dict, *, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0,
                 device: str | torch.device = "cpu"):
    """``(model, tokenizer)``: a random Qwen3-architecture model of ``shape`` and the tiny offline tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from ..tiny import build_tokenizer

    kw = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    tok = build_tokenizer()
    vocab = max(kw.pop("vocab_size"), len(tok))
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=kw["hidden_size"], num_hidden_layers=kw["num_layers"],
                      num_attention_heads=kw["num_heads"], num_key_value_heads=kw["num_kv_heads"],
                      head_dim=kw["head_dim"], intermediate_size=kw["intermediate_size"],
                      max_position_embeddings=65536, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    return model, tok


def long_block_sample(settings: BlockSettings, length: int, *, num_docs: int = 16, response_tokens: int = 256,
                      question_tokens: int = 32, vocab: int = 400, seed: int = 0) -> dict:
    """One ``{"input_ids", "labels"}`` block sample of exactly ``length`` tokens: ``num_docs`` context blocks of
    random token ids (ids 5..vocab-1, never the sink), a final block of question + response; labels on the
    response."""
    rng = random.Random(seed)
    k = settings.num_sinks
    body = length - (num_docs + 1) * k - question_tokens - response_tokens
    if body < num_docs:
        raise ValueError(f"length {length} is too short for {num_docs} documents and the final block")
    sizes = [body // num_docs + (i < body % num_docs) for i in range(num_docs)]

    def toks(n):
        out = []
        while len(out) < n:
            t = rng.randrange(5, vocab)
            if t != settings.sink_token_id:
                out.append(t)
        return out

    docs = [toks(n) for n in sizes]
    final = toks(question_tokens + response_tokens)
    ids = build_block_prompt([*docs, final], settings)
    if len(ids) != length:
        raise AssertionError(f"built {len(ids)} tokens, wanted {length}")
    labels = [-100] * (length - response_tokens) + ids[length - response_tokens:]
    return {"input_ids": ids, "labels": labels}
