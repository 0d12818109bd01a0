"""The paper's Table 5 ablations as config switches: without sinks (num_sinks=0), without block dropout
(block_dropout=false), without KL (kl_weight=0), without token weights (use_token_weights=false).
Each: construction, the loss on one batch (chunked path == full-logit path) and one training step."""

import pytest
import torch

from vllm_blockattn.distill import losses
from vllm_blockattn.distill.data import BlockDataCollator, ChatBlockFormatter, layout_from_lengths, make_retrieval_records
from vllm_blockattn.core.layout import BlockSettings

ABLATIONS = {
    "full_method": {},
    "no_sinks": {"num_sinks": 0},
    "no_dropout": {"block_dropout": False},
    "no_kl": {"kl_weight": 0.0},
    "no_token_weights": {"use_token_weights": False},
    "no_kl_no_weights": {"kl_weight": 0.0, "use_token_weights": False},
    "plus_full_kl": {"full_kl_weight": 1.0},  # not in the paper: keep the full-attention behaviour
    "full_kl_only_no_weights": {"kl_weight": 0.0, "use_token_weights": False, "full_kl_weight": 0.5},
    "one_forward": {"ce_pattern": "dropout"},  # CE and KL on the dropout pattern: one student forward
}


def _trainer(tmp_path, model_path, **kw):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.distill import BlockDistillationConfig, BlockDistillationTrainer

    args = BlockDistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                                   per_device_train_batch_size=3, max_steps=1, save_strategy="no", logging_steps=1,
                                   ce_tau=0.0, **kw)
    tok = AutoTokenizer.from_pretrained(model_path)
    fmt = ChatBlockFormatter(tok, BlockSettings.from_pretrained(model_path), sinks=args.num_sinks > 0)
    ds = Dataset.from_list([fmt(r) for r in make_retrieval_records(6, num_docs=3, facts_per_doc=2, seed=5)])
    model = AutoModelForCausalLM.from_pretrained(model_path)
    return BlockDistillationTrainer(model, args, train_dataset=ds, processing_class=tok)


def _terms(trainer, batch, chunk):
    trainer.args.logit_chunk_size = chunk
    trainer._dropout_generator.manual_seed(5)
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    m = trainer._metrics["train"]
    grad = trainer.model.get_input_embeddings().weight.grad.clone()
    return loss.item(), {k: v[-1] for k, v in m.items() if v}, grad


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_constructs_computes_and_steps(tmp_path, tiny_qwen3, name):
    kw = ABLATIONS[name]
    trainer = _trainer(tmp_path, tiny_qwen3, **kw)
    sink = trainer.block_settings.sink_token_id
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    teacher_rows = []
    if trainer.teacher_model is not None:
        trainer.teacher_model.register_forward_hook(lambda m, a, kw_, out: teacher_rows.append(kw_["input_ids"].shape[0]),
                                                    with_kwargs=True)
    student_rows = []
    trainer.model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: student_rows.append(a[0].shape[0]))
    trainer.model.train()
    if name == "plus_full_kl":  # move the student off the teacher, or its full-attention KL is exactly 0
        with torch.no_grad():
            w = trainer.model.model.layers[0].mlp.down_proj.weight
            w.add_(0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    full = _terms(trainer, batch, 0)
    teacher_calls, teacher_rows[:] = list(teacher_rows), []
    student_calls, student_rows[:] = list(student_rows), []
    chunked = _terms(trainer, batch, 5)
    assert chunked[0] == pytest.approx(full[0], rel=1e-5)
    assert chunked[1] == pytest.approx(full[1], rel=1e-5, abs=1e-7)
    assert torch.allclose(chunked[2], full[2], rtol=1e-4, atol=1e-6), (chunked[2] - full[2]).abs().max()
    loss, m, _ = full
    B = batch["input_ids"].shape[0]

    if name == "no_sinks":
        assert not (batch["input_ids"] == sink).any() and "block_lengths" in batch
        assert torch.equal(batch["full_input_ids"], batch["input_ids"])  # nothing to strip
        assert trainer.model.config.block_attention == trainer.served_settings.to_dict()  # served sink-free
        assert trainer.served_settings.sink_free
    else:
        assert (batch["input_ids"] == sink).any() and "block_lengths" not in batch
    if name == "no_dropout":
        assert m["dropped_fraction"] == 1.0
        assert teacher_calls == [2 * B]
    if name in ("no_kl", "no_kl_no_weights"):
        assert "kl" not in m and loss == pytest.approx(m["ce"], rel=1e-6)
    if name == "no_token_weights":
        assert m["hard_token_fraction"] == 1.0
        assert teacher_calls == [B]  # the full pattern only (for the KL): no block-pattern teacher pass
    if name == "no_kl_no_weights":
        assert trainer.teacher_model is None and teacher_calls == []
    if name == "plus_full_kl":
        assert m["full_kl"] > 0 and loss == pytest.approx(m["ce"] + m["kl"] + m["full_kl"], rel=1e-5)
        assert teacher_calls == [2 * B]
    if name == "full_kl_only_no_weights":
        # the student starts as the teacher: under full attention on the sink-free sequence they agree exactly
        assert "kl" not in m and m["full_kl"] == pytest.approx(0.0, abs=1e-6)
        assert teacher_calls == [B]
    if name == "full_method":
        assert 0 < m["hard_token_fraction"] < 1 and 0 < m["dropped_fraction"] < 1 and teacher_calls == [2 * B]
        assert student_calls == [2 * B]  # the block pattern (CE) and the dropout pattern (KL), stacked
    if name == "one_forward":
        assert student_calls == [B] and teacher_calls == [2 * B] and 0 < m["dropped_fraction"] < 1
        assert m["kl"] > 0 and loss == pytest.approx(m["ce"] + m["kl"], rel=1e-5)

    trainer.train()  # one optimizer step
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_no_sinks_uses_the_block_pattern_from_block_lengths(tmp_path, tiny_qwen3):
    """Without sinks the blocks still attend alone: with every token weighted 1 and no KL, the CE equals the
    reference block forward over the layout the lengths describe (and differs from full attention)."""
    from vllm_blockattn.core.reference import block_forward

    trainer = _trainer(tmp_path, tiny_qwen3, num_sinks=0, kl_weight=0.0, use_token_weights=False)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, batch)
        nll_block = nll_full = n = 0.0
        for i, n_tok in enumerate(batch["lengths"].tolist()):
            ids = batch["input_ids"][i, :n_tok]
            lay = layout_from_lengths(batch["block_lengths"][i].tolist())
            assert lay.num_tokens == n_tok and len(lay.blocks) == 1 + 1 + 3  # chat head, 3 documents, final
            resp = batch["labels"][i, :n_tok] != -100
            nll_block += losses.token_nll(block_forward(model, ids, lay)[None], ids[None])[0][resp].sum().item()
            nll_full += losses.token_nll(model(input_ids=ids[None]).logits, ids[None])[0][resp].sum().item()
            n += resp.sum().item()
    ce = trainer._metrics["eval"]["ce"][-1]
    assert ce == pytest.approx(nll_block / n, rel=1e-4)
    assert abs(ce - nll_full / n) > 1e-3


def test_collator_refuses_mixed_sink_and_sinkless_samples(tiny_qwen3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    settings = BlockSettings.from_pretrained(tiny_qwen3)
    rec = make_retrieval_records(1, seed=1)[0]
    a, b = ChatBlockFormatter(tok, settings)(rec), ChatBlockFormatter(tok, settings, sinks=False)(rec)
    assert len(a["input_ids"]) == len(b["input_ids"]) + settings.num_sinks * (len(b["block_lengths"]) - 1)
    with pytest.raises(ValueError, match="mixes"):
        BlockDataCollator(tok.pad_token_id, settings)([a, b])


def test_one_forward_computes_the_ce_on_the_dropout_pattern(tmp_path, tiny_qwen3):
    trainer = _trainer(tmp_path, tiny_qwen3)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    _, two, _ = _terms(trainer, batch, 0)
    trainer.args.ce_pattern = "dropout"
    _, one, _ = _terms(trainer, batch, 0)
    assert one["kl"] == pytest.approx(two["kl"], rel=1e-6)  # the same dropout pattern and teacher targets
    assert one["ce"] != pytest.approx(two["ce"], rel=1e-4)  # the CE now sees the dropout pattern
    assert one["hard_token_fraction"] == two["hard_token_fraction"]  # token weights come from the teacher


@pytest.mark.parametrize("mode", ["distill", "block_finetune"])
def test_no_sinks_checkpoint_is_saved_in_the_sink_free_layout(tmp_path, tiny_qwen3, mode):
    """num_sinks=0 (the paper's "w/o sinks" arm, and Block-FT without sinks) saves a checkpoint the plugin
    serves: a boundary token in the tokenizer, ``{"num_sinks": 0, "boundary_token_id"}`` in config.json.
    The pattern it trained under (blocks from ``block_lengths``) is the pattern served from boundaries:
    the same sample with boundary tokens has the same block-attention logits on every real token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.core.config import check_boundary_token
    from vllm_blockattn.core.layout import build_block_prompt, parse_block_prompt
    from vllm_blockattn.core.reference import block_forward

    trainer = _trainer(tmp_path, tiny_qwen3, num_sinks=0, mode=mode)
    trainer.train()
    out = tmp_path / "ckpt"
    trainer.save_model(str(out))
    served = BlockSettings.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert served.sink_free and served.boundary_token_id == tok.convert_tokens_to_ids("<|block_boundary|>")
    check_boundary_token(tok, served.boundary_token_id)  # what the engine checks at start-up
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.get_input_embeddings().weight.shape[0] > served.boundary_token_id
    batch = next(iter(trainer.get_train_dataloader()))
    n, lengths = int(batch["lengths"][0]), [int(x) for x in batch["block_lengths"][0] if x > 0]
    ids = batch["input_ids"][0, :n].tolist()
    pieces, at = [], 0
    for k in lengths:
        pieces.append(ids[at:at + k])
        at += k
    marked = build_block_prompt(pieces[1:], served, prefix=pieces[0])  # the chat head, documents, final
    with torch.no_grad():
        trained = block_forward(model, ids, layout_from_lengths(lengths))
        layout = parse_block_prompt(marked, served)
        serving = block_forward(model, marked, layout)[layout.real_token_indices()]
    assert (trained - serving).abs().max().item() <= 1e-4


def test_no_sinks_with_a_separately_loaded_teacher(tmp_path, tiny_qwen3):
    """num_sinks=0 grows the student's vocabulary by the boundary token; a teacher loaded from its own
    checkpoint gets the same row, so the KL compares like with like and a step runs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.distill import BlockDistillationConfig, BlockDistillationTrainer

    args = BlockDistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                                   per_device_train_batch_size=3, max_steps=1, save_strategy="no", logging_steps=1,
                                   ce_tau=0.0, num_sinks=0)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    fmt = ChatBlockFormatter(tok, BlockSettings.from_pretrained(tiny_qwen3), sinks=False)
    ds = Dataset.from_list([fmt(r) for r in make_retrieval_records(6, num_docs=3, facts_per_doc=2, seed=5)])
    trainer = BlockDistillationTrainer(AutoModelForCausalLM.from_pretrained(tiny_qwen3), args, train_dataset=ds,
                                       processing_class=tok, teacher_model=tiny_qwen3)
    rows = lambda m: m.get_input_embeddings().weight.shape[0]  # noqa: E731
    assert rows(trainer.teacher_model) == rows(trainer.model) > trainer.served_settings.boundary_token_id
    trainer.train()
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
