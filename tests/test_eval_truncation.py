"""LongBench truncation as ``pred.py`` does it (special tokens counted) and the default prompt budget
for models named by hub id (read through transformers' AutoConfig, or a clear error)."""

import json
import os

import pytest

from vllm_blockattn.eval import blocks, longbench

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "longbench")


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """The tiny tokenizer with a Llama-style post-processor: every encoded text starts with a BOS."""
    from tokenizers import processors

    from vllm_blockattn.tiny import build_tokenizer

    tok = build_tokenizer()
    bos = "<|endoftext|>"
    bos_id = tok.convert_tokens_to_ids(bos)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    path = tmp_path_factory.mktemp("bos-tok")
    tok.save_pretrained(path)
    return str(path)


def _row():
    with open(os.path.join(FIXTURES, "passage_retrieval_en.jsonl"), encoding="utf-8") as f:
        row = json.loads(f.readline())
    row["context"] = "\n\n".join(f"Paragraph {i}: " + "word " * 40 for i in range(1, 21))
    return row


def test_full_form_counts_the_bos_like_pred_py(bos_tokenizer):
    o = blocks.FormOptions.from_kwargs({"tokenizer": bos_tokenizer, "max_length": 800})
    assert o.special_tokens() == (1, 0)
    tok, spec, row = o.tokenizer, longbench.TASKS["passage_retrieval_en"], _row()
    prompt = spec.prompt.format(context=row["context"], input=row["input"])
    ids = tok(prompt)["input_ids"]  # pred.py: tokenizer(prompt, truncation=False), BOS included
    assert ids[0] == tok.convert_tokens_to_ids("<|endoftext|>") and len(ids) > 1500
    want = tok.decode(ids[:400], skip_special_tokens=True) + tok.decode(ids[-400:], skip_special_tokens=True)
    full, _ = longbench.build_prompt(spec, row, o, block=False)
    assert full == want
    # the BOS takes one of the head's 400 slots: the head holds 399 prompt tokens, not 400
    plain = tok.encode(prompt, add_special_tokens=False)
    assert full != tok.decode(plain[:400]) + tok.decode(plain[-400:])
    # block form: same budget with the BOS counted
    block, _ = longbench.build_prompt(spec, row, o, block=True)
    assert len(tok(block)["input_ids"]) <= 800


def test_no_truncation_when_the_prompt_fits_with_its_bos(bos_tokenizer):
    spec, row = longbench.TASKS["passage_retrieval_en"], _row()
    prompt = spec.prompt.format(context=row["context"], input=row["input"])
    o = blocks.FormOptions.from_kwargs({"tokenizer": bos_tokenizer, "max_length": 10**6})
    n = len(o.tokenizer(prompt)["input_ids"])
    at = blocks.FormOptions.from_kwargs({"tokenizer": bos_tokenizer, "max_length": n})
    assert longbench.build_prompt(spec, row, at, block=False)[0] == prompt
    below = blocks.FormOptions.from_kwargs({"tokenizer": bos_tokenizer, "max_length": n - 1})
    assert longbench.build_prompt(spec, row, below, block=False)[0] != prompt  # BOS + prompt is one too many


def test_default_max_length_for_a_hub_model_name(tiny_qwen3, monkeypatch):
    import transformers

    seen = []

    class Config:
        def to_dict(self):
            return {"max_position_embeddings": 4096}

    original = transformers.AutoConfig.from_pretrained

    def from_pretrained(name, **kw):
        if name != "some-org/some-model-4k":
            return original(name, **kw)
        seen.append(name)
        return Config()

    blocks._model_config.cache_clear()
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    o = blocks.FormOptions.from_kwargs({"pretrained": "some-org/some-model-4k", "tokenizer": tiny_qwen3}, 128)
    assert seen == ["some-org/some-model-4k"] and o.max_length == 4096 - 128
    blocks._model_config.cache_clear()


def test_unreadable_hub_config_fails_clearly(tiny_qwen3):
    blocks._model_config.cache_clear()
    kw = {"pretrained": "no-such-org/no-such-model-xyz", "tokenizer": tiny_qwen3}
    with pytest.raises(ValueError, match="max_length") as err:
        blocks.FormOptions.from_kwargs(kw, 64)
    assert "no-such-org/no-such-model-xyz" in str(err.value) and "max_model_len" in str(err.value)
    # an explicit budget needs no config
    assert blocks.FormOptions.from_kwargs({**kw, "max_length": 1000}, 64).max_length == 1000
    assert blocks.FormOptions.from_kwargs({**kw, "max_model_len": 2048}, 64).max_length == 2048 - 64


def test_window_in_a_nested_text_config():
    assert blocks._window({"text_config": {"max_position_embeddings": 8192}}) == 8192
    assert blocks._window({"max_position_embeddings": 4096, "text_config": {"max_position_embeddings": 8}}) == 4096
    assert blocks._window({}) is None
