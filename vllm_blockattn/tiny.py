"""Tiny-model kit: random Qwen3/Llama checkpoints with an offline tokenizer, built on the fly.

Nothing downloads. The tokenizer is a byte-level BPE trained in a fraction of a second on an embedded
corpus; it has the chat-template specials and ``<|block_sink|>``. The checkpoint is saved with the
``block_attention`` entry in ``config.json`` so the vLLM plugin and the reference read the same settings.

Usage::

    python -m vllm_blockattn.tiny /tmp/tiny-qwen3 --arch qwen3
"""

from __future__ import annotations

import argparse
import json
import os

from .core.layout import BOUNDARY_TOKEN, CONFIG_KEY, DEFAULT_NUM_SINKS, SINK_TOKEN, BlockSettings

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>", SINK_TOKEN]

# A ChatML template, like Qwen's, so chat requests and lm-eval's chat paths work on the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
Block attention splits a prompt into blocks. Every block but the last attends only to itself.
The last block holds the question and every generated token, and it attends to everything.
A document's keys and values then depend on its own tokens alone, so they can be computed once
and reused in any later prompt, at any offset, in any order.
The river flows past the old mill, where the miller keeps his books in a wooden chest.
Alice moved to Paris in 2019 and works as a nurse. Bob collects stamps from 42 countries.
Question: Where does Alice live? Answer: Paris. Question: How many countries? Answer: 42.
def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n
Caroline: Hey Mel! How was the concert last night? Melanie: It was great, thanks for asking!
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?
"""


def build_tokenizer(vocab_size: int = 512, *, boundary: bool = False):
    """A fast byte-level BPE tokenizer with the project's special tokens, trained offline; with
    ``boundary`` also the sink-free layout's ``<|block_boundary|>``."""
    specials = SPECIAL_TOKENS + ([BOUNDARY_TOKEN] if boundary else [])
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=specials[1:],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_config(arch: str = "qwen3", vocab_size: int = 512, *, hidden_size: int = 128, num_layers: int = 2,
                 num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 32, intermediate_size: int | None = None,
                 rope_scaling: dict | None = None, max_position_embeddings: int = 32768, eos_token_id: int = 0):
    """A small config. ``head_dim`` >= 32 so that vLLM's CPU attention takes it."""
    from transformers import LlamaConfig, Qwen3Config

    if head_dim < 32 or head_dim % 16:
        raise ValueError(f"head_dim must be a multiple of 16 and >= 32 for vLLM's CPU backend, got {head_dim}")
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=max_position_embeddings,
        eos_token_id=eos_token_id, bos_token_id=eos_token_id, pad_token_id=eos_token_id, tie_word_embeddings=False,
    )
    if arch == "qwen3":
        if rope_scaling is not None:
            common["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
        return Qwen3Config(**common)
    if arch == "llama":
        if rope_scaling is not None:
            common["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
        return LlamaConfig(**common)
    raise ValueError(f"unknown arch {arch!r}; expected 'qwen3' or 'llama'")


def build_tiny_model(path: str | os.PathLike, arch: str = "qwen3", *, seed: int = 0, sharpen: float = 1.0,
                     num_sinks: int = DEFAULT_NUM_SINKS, dtype: str = "float32", **config_kwargs) -> str:
    """Build a random tiny checkpoint with tokenizer and ``block_attention`` settings under ``path``.

    Args:
        path: output directory (created).
        arch: ``"qwen3"`` or ``"llama"``.
        seed: torch seed for the random weights.
        sharpen: scale of the output layer and attention projections. Random tiny models are flat
            (greedy decoding repeats one token whatever the mask); > 1 makes attention patterns matter.
        num_sinks: sinks per group written to ``config.json``; 0 builds a sink-free checkpoint (a
            Block-FT-style model): its tokenizer gets ``<|block_boundary|>`` and ``config.json`` records
            ``{"num_sinks": 0, "boundary_token_id": ...}``.
        dtype: weights dtype saved.
        **config_kwargs: passed to :func:`build_config` (hidden_size, num_layers, head_dim, ...).

    Returns:
        ``path`` as a string.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = str(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(boundary=num_sinks == 0)
    settings = BlockSettings.from_tokenizer(tokenizer, num_sinks=num_sinks)
    config = build_config(arch, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **config_kwargs)
    setattr(config, CONFIG_KEY, settings.to_dict())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if sharpen != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "lm_head.weight")):
                    p.mul_(sharpen)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    if saved.get(CONFIG_KEY) != settings.to_dict():  # the config class dropped the extra attribute
        saved[CONFIG_KEY] = settings.to_dict()
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(saved, f, indent=2)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--arch", default="qwen3", choices=["qwen3", "llama"])
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--num-kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--sharpen", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-sinks", type=int, default=DEFAULT_NUM_SINKS,
                    help="sinks per block; 0 builds a sink-free checkpoint with a boundary token")
    a = ap.parse_args(argv)
    print(build_tiny_model(a.path, a.arch, seed=a.seed, sharpen=a.sharpen, num_sinks=a.num_sinks, hidden_size=a.hidden_size,
                           num_layers=a.num_layers, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                           head_dim=a.head_dim))


if __name__ == "__main__":
    main()
