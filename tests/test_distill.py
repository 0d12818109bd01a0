"""Block distillation: loss terms, masks, sinks, data and the trainer step, on tiny hand-made cases."""

import json
import math

import pytest
import torch

from vllm_blockattn.distill import losses, masks
from vllm_blockattn.distill.config import BlockDistillationConfig
from vllm_blockattn.distill.data import (BlockDataCollator, ChatBlockFormatter, load_chatqa2, load_hotpotqa,
                                         load_records, load_segmenter, make_retrieval_records, split_paragraphs)
from vllm_blockattn.distill.sinks import add_sink_token, apply_sink_peft, write_block_config
from vllm_blockattn.core.layout import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.core.reference import block_attention_mask, full_attention_mask

S = 99  # sink id of the hand-made layouts
SETTINGS = BlockSettings(sink_token_id=S, num_sinks=2)
MIN = torch.finfo(torch.float32).min


def small_layout():
    """prefix [7, 8] | S S 1 2 3 | S S 4 5 | S S 6 10 11 (final)  -> 16 tokens."""
    ids = build_block_prompt([[1, 2, 3], [4, 5], [6, 10, 11]], SETTINGS, prefix=[7, 8])
    return ids, parse_block_prompt(ids, SETTINGS)


# --- losses -------------------------------------------------------------------------------------------

def test_token_nll_indexes_by_predicted_token():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[2, 1, 0]])
    nll = losses.token_nll(logits, ids)
    assert nll.shape == (1, 3)
    assert nll[0, 0] == 0
    assert nll[0, 1].item() == pytest.approx(-math.log(0.25), abs=1e-6)  # token 1 predicted at position 0
    assert nll[0, 2].item() == pytest.approx(-math.log(0.1), abs=1e-6)


def test_token_weights_are_one_where_block_hurts_teacher_else_beta():
    block = torch.tensor([[0.0, 1.0, 0.05, 2.0, 9.0]])
    full = torch.tensor([[0.0, 0.5, 0.00, 0.5, 0.0]])
    resp = torch.tensor([[False, True, True, True, False]])
    w = losses.token_weights(block, full, resp, tau=0.1, beta=0.1)
    assert w[0].tolist() == pytest.approx([0.0, 1.0, 0.1, 1.0, 0.0])
    # A larger tau turns the 0.5 gap into an easy token.
    assert losses.token_weights(block, full, resp, tau=1.0, beta=0.25)[0].tolist() == pytest.approx(
        [0.0, 0.25, 0.25, 1.0, 0.0])


def test_weighted_ce_normalises_by_response_tokens():
    nll = torch.tensor([[5.0, 2.0, 4.0, 1.0]])
    resp = torch.tensor([[False, True, True, True]])
    w = torch.tensor([[0.0, 1.0, 0.1, 1.0]])
    assert losses.weighted_ce_loss(nll, w, resp).item() == pytest.approx((2.0 + 0.4 + 1.0) / 3)


def test_weighted_ce_normalised_by_the_weights_is_on_plain_ces_scale():
    nll = torch.tensor([[5.0, 2.0, 4.0, 1.0]])
    resp = torch.tensor([[False, True, True, True]])
    w = torch.tensor([[0.0, 1.0, 0.1, 1.0]])
    assert losses.weighted_ce_loss(nll, w, resp, "weights").item() == pytest.approx((2.0 + 0.4 + 1.0) / 2.1)
    ones = resp.float()  # all weights 1: both normalisations are plain CE
    assert losses.weighted_ce_loss(nll, ones, resp, "weights").item() == pytest.approx(
        losses.weighted_ce_loss(nll, ones, resp, "tokens").item())
    # all tokens easy: "tokens" shrinks the loss by beta, "weights" keeps plain CE's scale
    easy = ones * 0.1
    assert losses.weighted_ce_loss(nll, easy, resp, "tokens").item() == pytest.approx(0.1 * 7.0 / 3)
    assert losses.weighted_ce_loss(nll, easy, resp, "weights").item() == pytest.approx(7.0 / 3)
    with pytest.raises(ValueError, match="normalization"):
        losses.weighted_ce_loss(nll, w, resp, "sum")


def test_block_kl_is_forward_kl_teacher_to_student():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    pt, ls = t.log_softmax(-1), s.log_softmax(-1)
    forward = (pt.exp() * (pt - ls)).sum(-1).mean()
    reverse = (ls.exp() * (ls - pt)).sum(-1).mean()
    got = losses.block_kl_loss(s, t)
    assert got.item() == pytest.approx(forward.item(), rel=1e-5)
    assert abs(got.item() - reverse.item()) > 1e-3
    assert losses.block_kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.block_kl_loss(s[:0], t[:0]).item() == 0.0


def test_block_finetune_loss_averages_both_patterns():
    b, f = torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    rb, rf = torch.tensor([[False, True, True]]), torch.tensor([[False, True]])
    assert losses.block_finetune_loss(b, f, rb, rf).item() == pytest.approx(7.0 / 3)


# --- masks --------------------------------------------------------------------------------------------

def test_sample_dropped_blocks_seeded_and_rate_bounds():
    _, lay = small_layout()  # context blocks: 0 (prefix), 1, 2
    g = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    assert masks.sample_dropped_blocks(lay, 0.6, g()) == masks.sample_dropped_blocks(lay, 0.6, g())
    assert masks.sample_dropped_blocks(lay, 0.0, g()) == ()
    assert masks.sample_dropped_blocks(lay, 1.0, g()) == (0, 1, 2)
    gen = g()
    n = sum(len(masks.sample_dropped_blocks(lay, 0.6, gen)) for _ in range(2000))
    assert 0.55 < n / 6000 < 0.65
    with pytest.raises(ValueError, match="rate"):
        masks.sample_dropped_blocks(lay, 1.5)


def test_dropout_mask_pattern():
    ids, lay = small_layout()
    assert len(ids) == 16 and [b.start for b in lay.blocks] == [0, 2, 7, 11]
    m = masks.dropout_attention_mask(lay, (1,))[0, 0]
    assert m.shape == (16, 16)
    allowed = m == 0
    # Block 1 (tokens 2..6) is encoded alone: token 6 sees 2..6 only.
    assert allowed[6].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    # Block 2 (tokens 7..10) keeps full causal attention: it sees the prefix and block 1.
    assert allowed[9].nonzero().flatten().tolist() == list(range(10))
    # The final block sees everything before it.
    assert allowed[15].all()
    assert torch.equal(masks.dropout_attention_mask(lay, (0, 1, 2)), block_attention_mask(lay))
    assert torch.equal(masks.dropout_attention_mask(lay, ()), full_attention_mask(16))
    with pytest.raises(ValueError, match="not a context block"):
        masks.dropout_attention_mask(lay, (3,))


def test_kl_positions_and_content_index():
    ids, lay = small_layout()
    # dropped block 1 -> KL on prefix (0 -> predicts 1), block 2 content 9 (predicts 10), final 13, 14.
    q = masks.kl_query_mask(lay, (1,))
    assert q.nonzero().flatten().tolist() == [0, 9, 13, 14]
    assert masks.kl_query_mask(lay, ()).nonzero().flatten().tolist() == [0, 4, 5, 9, 13, 14]
    ci = masks.content_index(lay)
    assert ci.tolist() == [0, 1, -1, -1, 2, 3, 4, -1, -1, 5, 6, -1, -1, 7, 8, 9]


def test_batch_dropout_masks_equal_the_per_sample_reference():
    ids, lay = small_layout()
    ids2 = build_block_prompt([[1, 2], [4, 5, 6, 12], [9, 10]], SETTINGS, prefix=[7])
    lay2 = parse_block_prompt(ids2, SETTINGS)
    layouts = [lay, lay2, lay]
    L = max(x.num_tokens for x in layouts) + 2  # padding on every row
    block = masks.pad_attention_masks([block_attention_mask(x) for x in layouts], L)
    for dropped in ([(), (1, 2), (0, 1, 2)], [(2,), (), (1,)]):
        ref = masks.pad_attention_masks([masks.dropout_attention_mask(x, d) for x, d in zip(layouts, dropped)], L)
        assert torch.equal(masks.batch_dropout_attention_masks(block, layouts, dropped), ref)
    with pytest.raises(ValueError, match="not a context block"):
        masks.batch_dropout_attention_masks(block, layouts, [(), (3,), ()])
    with pytest.raises(ValueError, match="3 block masks"):
        masks.batch_dropout_attention_masks(block, layouts[:2], [(), ()])

def test_pad_attention_masks():
    _, lay = small_layout()
    out = masks.pad_attention_masks([block_attention_mask(lay), full_attention_mask(3)], 16)
    assert out.shape == (2, 1, 16, 16)
    assert torch.equal(out[0, 0], block_attention_mask(lay)[0, 0])
    assert torch.equal(out[1, 0, :3, :3], full_attention_mask(3)[0, 0])
    assert (out[1, 0, 5] == 0).nonzero().flatten().tolist() == [5]  # a pad row sees only itself
    assert (out[1, 0, :, 5] == MIN).sum() == 15


# --- sinks --------------------------------------------------------------------------------------------

def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "[UNK]", "a", "b", "c", "d"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]")


def _tiny_model(vocab):
    from transformers import AutoModelForCausalLM

    from vllm_blockattn.tiny import build_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(build_config("qwen3", vocab_size=vocab, hidden_size=64, num_layers=1,
                                                         num_heads=2, num_kv_heads=1, head_dim=32))


def test_add_sink_token_resizes_and_mean_initialises(tmp_path):
    tok = _word_tokenizer()
    model = _tiny_model(len(tok))
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    settings = add_sink_token(tok, model, num_sinks=4)
    assert settings == BlockSettings(sink_token_id=6, num_sinks=4)
    assert tok.convert_tokens_to_ids("<|block_sink|>") == 6
    assert tok.encode("a <|block_sink|> b", add_special_tokens=False) == [2, 6, 3]
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 7
    assert torch.allclose(emb[6], emb_before.mean(0)) and torch.equal(emb[:6], emb_before)
    assert torch.allclose(model.get_output_embeddings().weight[6], out_before.mean(0))
    assert model.config.block_attention == {"sink_token_id": 6, "num_sinks": 4}
    # Saved checkpoint carries the entry (write_block_config guarantees it).
    model.save_pretrained(tmp_path)
    write_block_config(tmp_path, settings)
    assert BlockSettings.from_pretrained(tmp_path) == settings
    # Idempotent: a second call neither adds nor re-initialises.
    with torch.no_grad():
        emb[6] = 1.0
    assert add_sink_token(tok, model) == BlockSettings(6, 4)
    assert torch.all(model.get_input_embeddings().weight[6] == 1.0)


def test_add_sink_token_uses_padded_embedding_rows_without_resizing():
    tok = _word_tokenizer()
    model = _tiny_model(16)  # embeddings padded beyond the tokenizer, as in many checkpoints
    before = model.get_input_embeddings().weight.detach().clone()
    settings = add_sink_token(tok, model, init="eos")
    assert settings.sink_token_id == 6
    assert model.get_input_embeddings().weight.shape[0] == 16
    assert torch.equal(model.get_input_embeddings().weight[6], before[tok.eos_token_id])


def test_sink_row_trainable_under_lora():
    from peft import LoraConfig, get_peft_model

    tok = _word_tokenizer()
    model = _tiny_model(len(tok))
    settings = add_sink_token(tok, model)
    cfg = apply_sink_peft(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), settings)
    assert cfg.trainable_token_indices == {"embed_tokens": [settings.sink_token_id]}
    peft_model = get_peft_model(model, cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("token_adapter" in n for n in trainable)
    loss = peft_model(input_ids=torch.tensor([[6, 2, 3, 6, 4]])).logits.sum()
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "token_adapter" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


# --- data ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tok():
    from vllm_blockattn.tiny import build_tokenizer

    return build_tokenizer()


def test_formatter_layout_and_labels(tiny_tok):
    settings = BlockSettings.from_tokenizer(tiny_tok)
    fmt = ChatBlockFormatter(tiny_tok, settings)
    rec = {"context": ["Alice moved to Paris.\n\n", "Bob collects stamps.\n\n"], "question": "Where does Alice live?",
           "answer": "Paris"}
    sample = fmt(rec)
    lay = parse_block_prompt(sample["input_ids"], settings)
    assert len(lay.blocks) == 4 and lay.blocks[0].content_start == 0  # chat head, 2 documents, final
    head = tiny_tok.decode(sample["input_ids"][: lay.blocks[1].start])
    assert head == "<|im_start|>user\n"
    assert tiny_tok.decode(sample["input_ids"][lay.blocks[1].content_start: lay.blocks[1].end]) == rec["context"][0]
    labelled = [t for t in sample["labels"] if t != -100]
    assert tiny_tok.decode(labelled) == "Paris<|im_end|>\n"
    assert sample["labels"][-len(labelled):] == sample["input_ids"][-len(labelled):]
    final = tiny_tok.decode(sample["input_ids"][lay.final.content_start:])
    assert final == "Where does Alice live?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
    assert fmt.prompt_ids(rec) == sample["input_ids"][: -len(labelled)]
    # Too long for max_length: trailing context blocks go first.
    short = ChatBlockFormatter(tiny_tok, settings, max_length=len(sample["input_ids"]) - 1)(rec)
    assert len(parse_block_prompt(short["input_ids"], settings).blocks) == 3
    assert ChatBlockFormatter(tiny_tok, settings, max_length=10)(rec) is None


def test_collator_builds_sink_free_copy(tiny_tok):
    settings = BlockSettings.from_tokenizer(tiny_tok)
    fmt = ChatBlockFormatter(tiny_tok, settings)
    recs = make_retrieval_records(3, num_docs=3, facts_per_doc=2, seed=1)
    batch = BlockDataCollator(tiny_tok.pad_token_id, settings)([fmt(r) for r in recs])
    ids, ci, full = batch["input_ids"], batch["content_index"], batch["full_input_ids"]
    for i in range(3):
        n = batch["lengths"][i].item()
        real = ci[i, :n] >= 0
        assert (ids[i, :n][~real] == settings.sink_token_id).all()
        assert torch.equal(full[i, ci[i, :n][real]], ids[i, :n][real])
        assert (batch["labels"][i] != -100).sum() == (batch["full_labels"][i] != -100).sum()
        assert (ids[i, n:] == tiny_tok.pad_token_id).all() and (batch["labels"][i, n:] == -100).all()


def test_synthetic_records_answerable():
    for rec in make_retrieval_records(20, num_docs=4, facts_per_doc=3, seed=2):
        assert len(rec["context"]) == 4
        words = rec["question"].split()
        attr, name = words[3], words[5]
        assert f"{name} {attr} {rec['answer']} ." in "".join(rec["context"])
    rec = make_retrieval_records(1, question_style="prefix", seed=3)[0]
    assert f"{rec['question']} {rec['answer']} ." in "".join(rec["context"])
    for rec in make_retrieval_records(5, num_docs=4, facts_per_doc=2, question_style="prefix", distinct_names=True,
                                      attributes=("city",), seed=4):
        facts = " ".join(rec["context"]).split(" . ")
        facts = [f.split() for f in facts if f.strip()]
        assert len(facts) == 8 and {f[0] for f in facts} == {"city"}
        assert len({f[1] for f in facts}) == 8  # distinct names
        assert rec["question"].split()[0] == "city"
    with pytest.raises(ValueError, match="attributes"):
        make_retrieval_records(1, attributes=("height",))
    for rec in make_retrieval_records(5, num_docs=8, facts_per_doc=1, question_style="prefix",
                                      distinct_attributes=True, num_questions=3, seed=5):
        facts = [d.split()[:3] for d in rec["context"]]
        assert len({f[1] for f in facts}) == 8  # one fact per attribute
        first, *rest = rec["answer"].split(" . ")
        assert rec["question"].split() + [first] in facts
        assert len(rest) == 2 and all(q.split() in facts for q in rest)


def test_synthetic_updates_answer_with_the_latest_statement():
    recs = make_retrieval_records(50, num_docs=8, facts_per_doc=1, question_style="prefix", distinct_attributes=True,
                                  updates=1.0, seed=6)
    for rec in recs:
        facts = [d.split()[:3] for d in rec["context"]]
        asked = rec["question"].split()
        stated = [f for f in facts if f[:2] == asked]
        assert len(stated) == 2 and stated[0][2] != stated[1][2]  # stated twice, with two values
        assert stated[1][2] == rec["answer"]  # the later document wins
    half = make_retrieval_records(400, num_docs=8, facts_per_doc=1, question_style="prefix",
                                  distinct_attributes=True, updates=0.5, seed=6)
    n_updated = sum(sum(d.split()[:2] == r["question"].split() for d in r["context"]) == 2 for r in half)
    assert 150 < n_updated < 250
    plain = make_retrieval_records(20, num_docs=8, facts_per_doc=1, question_style="prefix", distinct_attributes=True,
                                   seed=6)
    assert plain == make_retrieval_records(20, num_docs=8, facts_per_doc=1, question_style="prefix",
                                           distinct_attributes=True, seed=6, updates=0.0)
    with pytest.raises(ValueError, match="updates"):
        make_retrieval_records(1, updates=1.5)
    with pytest.raises(ValueError, match="updates needs"):
        make_retrieval_records(1, num_docs=1, updates=0.5)

def test_loaders_and_errors(tmp_path):
    hp = tmp_path / "hotpot.jsonl"
    hp.write_text(json.dumps({"question": "Q?", "answer": "A", "context": [["T1", ["s1. ", "s2."]], ["T2", ["s3."]]]})
                  + "\n\n" + json.dumps({"question": "Q2?", "answer": "B", "context": "p1\n\np2\n\n\np3"}) + "\n")
    recs = load_hotpotqa(hp)
    assert recs[0]["context"] == ["T1: s1. s2.\n\n", "T2: s3.\n\n"]
    assert recs[1]["context"] == ["p1\n\n", "p2\n\n", "p3\n\n"]
    cq = tmp_path / "chatqa.jsonl"
    cq.write_text(json.dumps({"document": "d1\n\nd2", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]}) + "\n")
    assert load_chatqa2(cq) == [{"context": ["d1\n\n", "d2\n\n"], "question": "User: hi\nAssistant: hello\nQ?",
                                 "answer": "A"}]
    assert load_records(cq)[0]["answer"] == "A"  # auto-detected
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_hotpotqa(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": "A", "context": ["p"]}\n{"question": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_hotpotqa(bad)
    bad.write_text('{"question": "Q", "context": ["p"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer'"):
        load_hotpotqa(bad)
    bad.write_text('{"document": "d", "messages": [{"role": "user", "content": "Q"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no response"):
        load_chatqa2(bad)
    assert load_segmenter("paragraphs") is split_paragraphs
    assert load_segmenter("vllm_blockattn.distill.data:split_paragraphs") is split_paragraphs
    with pytest.raises(ValueError, match="segmenter"):
        load_segmenter("nonsense")


def test_learned_segmenter_hook():
    text = "Alice moved to Paris in 2019.\n\nShe works as a nurse.\n\nBob collects stamps from 42 countries.\n"
    blocks = load_segmenter("learned")(text)
    assert blocks and "".join(blocks) == text


def test_config_checks(tmp_path):
    cfg = BlockDistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    assert (cfg.block_dropout_rate, cfg.ce_beta, cfg.num_sinks, cfg.mode) == (0.6, 0.1, 4, "distill")
    assert cfg.dataset_kwargs["skip_prepare_dataset"] and cfg.remove_unused_columns is False
    for bad in ({"block_dropout_rate": 1.5}, {"mode": "x"}, {"ce_beta": -1.0}, {"num_sinks": -1}):
        with pytest.raises(ValueError):
            BlockDistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **bad)


# --- attention implementations and the trainer step ---------------------------------------------------

def test_eager_and_sdpa_agree_on_dropout_masks(tiny_qwen3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    settings = BlockSettings.from_pretrained(tiny_qwen3)
    fmt = ChatBlockFormatter(tok, settings)
    batch = BlockDataCollator(tok.pad_token_id, settings)([fmt(r) for r in make_retrieval_records(2, seed=4)])
    ids = batch["input_ids"]
    lays = [parse_block_prompt(ids[i, :n].tolist(), settings) for i, n in enumerate(batch["lengths"].tolist())]
    drop = masks.pad_attention_masks([masks.dropout_attention_mask(x, (0, 2)) for x in lays], ids.shape[1])
    pos = torch.zeros_like(ids)
    for i, x in enumerate(lays):
        pos[i, : x.num_tokens] = torch.tensor(x.positions())
    out = {}
    for impl in ("eager", "sdpa"):
        m = AutoModelForCausalLM.from_pretrained(tiny_qwen3, attn_implementation=impl)
        out[impl] = m(input_ids=ids, attention_mask=drop, position_ids=pos).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(out["eager"][real], out["sdpa"][real], atol=1e-4)
    n0 = batch["lengths"][0].item()
    kl = losses.block_kl_loss(out["eager"][0, :n0], out["sdpa"][0, :n0])
    assert kl.item() < 1e-6
    # The dropout mask matters on this model (a check that cannot pass by accident).
    full = m(input_ids=ids[:1, :n0]).logits[0]
    assert (full - out["sdpa"][0, :n0]).abs().max() > 1e-2


def _trainer(tmp_path, model_path, **kw):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.distill import BlockDistillationTrainer

    tok = AutoTokenizer.from_pretrained(model_path)
    settings = BlockSettings.from_pretrained(model_path)
    fmt = ChatBlockFormatter(tok, settings)
    ds = Dataset.from_list([fmt(r) for r in make_retrieval_records(4, num_docs=3, facts_per_doc=2, seed=5)])
    peft_config = kw.pop("peft_config", None)
    args = BlockDistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                                   gradient_checkpointing=False, per_device_train_batch_size=2, max_steps=1,
                                   save_strategy="no", logging_steps=1, **kw)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    return BlockDistillationTrainer(model, args, train_dataset=ds, processing_class=tok, peft_config=peft_config)


def test_distill_step_loss_terms(tmp_path, tiny_qwen3):
    from vllm_blockattn.core.reference import block_forward, full_forward

    trainer = _trainer(tmp_path, tiny_qwen3, ce_tau=-1e9)  # every response token is "hard": weight 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model.eval()
    m = trainer._metrics["eval"]
    loss = trainer.compute_loss(model, batch)
    assert m["hard_token_fraction"][-1] == 1.0
    assert loss.item() == pytest.approx(m["ce"][-1] + m["kl"][-1], rel=1e-5)

    # Independent recomputation, one unpadded sample at a time, with the reference forwards.
    nll_sum = n_resp = kl_sum = n_kl = 0.0
    for i, n in enumerate(batch["lengths"].tolist()):
        ids = batch["input_ids"][i, :n]
        lay = parse_block_prompt(ids.tolist(), trainer.block_settings)
        resp = batch["labels"][i, :n] != -100
        nll = losses.token_nll(block_forward(model, ids, lay)[None], ids[None])[0]
        nll_sum, n_resp = nll_sum + nll[resp].sum().item(), n_resp + resp.sum().item()
        # Nothing dropped: the student runs full causal attention over the sinked sequence, the teacher
        # (= the initial student) over the sink-free one; KL on content positions that predict content.
        student = model(input_ids=ids[None]).logits[0]
        keep = ids != trainer.block_settings.sink_token_id
        teacher = full_forward(model, ids[keep])
        q = masks.kl_query_mask(lay, ())
        ci = masks.content_index(lay)
        pt, ps = teacher[ci[q]].log_softmax(-1), student[q].log_softmax(-1)
        kl_sum, n_kl = kl_sum + (pt.exp() * (pt - ps)).sum().item(), n_kl + q.sum().item()
    assert m["ce"][-1] == pytest.approx(nll_sum / n_resp, rel=1e-4)

    trainer.args.block_dropout_rate = 0.0
    trainer.compute_loss(model, batch)
    assert m["kl"][-1] == pytest.approx(kl_sum / n_kl, rel=1e-3)
    # tau huge: every token is "easy", the CE shrinks by beta.
    trainer.args.ce_tau = 1e9
    trainer.compute_loss(model, batch)
    assert m["hard_token_fraction"][-1] == 0.0
    assert m["ce"][-1] == pytest.approx(0.1 * nll_sum / n_resp, rel=1e-4)


def test_peft_distill_uses_base_as_teacher_and_saves_block_config(tmp_path, tiny_qwen3):
    from peft import LoraConfig

    trainer = _trainer(tmp_path / "run", tiny_qwen3, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                       learning_rate=1e-2)
    assert trainer.teacher_model is None
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(tmp_path / "out")
    write_block_config(tmp_path / "out", trainer.block_settings)
    assert BlockSettings.from_pretrained(tmp_path / "out") == BlockSettings.from_pretrained(tiny_qwen3)


def test_teacher_cache_gives_the_live_teacher_loss(tmp_path, tiny_qwen3):
    """The cached teacher (built once, in other batches) gives the same CE, KL and token weights as the live
    teacher on a fixed batch and dropout draw; a sample missing from the cache falls back to the live teacher."""
    trainer = _trainer(tmp_path, tiny_qwen3, teacher_cache=True, ce_tau=0.0)
    ds = trainer.train_dataset
    assert len(trainer.teacher_cache) == len(ds)
    w, logits = next(iter(trainer.teacher_cache.values()))
    assert logits.dtype == torch.float32 and logits.shape[1] == trainer.model.config.vocab_size
    # Build the cache again one sample per batch (other padding than the training batches).
    stats = trainer.build_teacher_cache(ds, batch_size=1)
    assert stats["samples"] == len(ds) and stats["seconds"] > 0
    model = trainer.model.eval()
    m = trainer._metrics["eval"]
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    results = []
    for cache in (trainer.teacher_cache, None):
        trainer.teacher_cache = cache
        trainer._dropout_generator.manual_seed(123)
        loss = trainer.compute_loss(model, batch).item()
        results.append((loss, m["ce"][-1], m["kl"][-1], m["hard_token_fraction"][-1]))
    (cached, live) = results
    assert 0 < live[2] and 0 < live[3] < 1  # a real KL and a mix of hard and easy tokens
    assert cached == pytest.approx(live, rel=1e-4, abs=1e-6)
    assert m["teacher_cache_hit"] == [1.0]  # logged only while a cache is set
    # A batch with an uncached sample uses the live teacher.
    trainer.teacher_cache = {}
    trainer._dropout_generator.manual_seed(123)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(live[0], rel=1e-4)
    assert m["teacher_cache_hit"][-1] == 0.0
    with pytest.raises(ValueError, match="teacher_cache needs mode='distill'"):
        BlockDistillationConfig(output_dir=str(tmp_path), mode="block_finetune", teacher_cache=True, use_cpu=True)
