"""The teacher: its sink row, its placement by accelerate/TRL, and the distributed launch configs."""

import os

import pytest
import torch

from vllm_blockattn.distill.config import BlockDistillationConfig
from vllm_blockattn.distill.sinks import add_sink_token

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "train", "configs")


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "[UNK]", "a", "b", "c", "d"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]")


def _checkpoint(path, seed, vocab=6, block_config=None):
    """A tiny Qwen3 checkpoint whose tokenizer has no sink token (vocab rows may be padded)."""
    from transformers import AutoModelForCausalLM

    from vllm_blockattn.tiny import build_config

    torch.manual_seed(seed)
    cfg = build_config("qwen3", vocab_size=vocab, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=32)
    if block_config:
        cfg.block_attention = block_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return str(path)


def _rows(model, i):
    return model.get_input_embeddings().weight[i].detach().clone(), model.get_output_embeddings().weight[i].detach().clone()


def _dataset():
    from datasets import Dataset

    from vllm_blockattn.core.layout import BlockSettings, build_block_prompt

    ids = build_block_prompt([[2, 3], [4, 5, 2]], BlockSettings(sink_token_id=6, num_sinks=4))
    return Dataset.from_list([{"input_ids": ids, "labels": [-100] * (len(ids) - 2) + ids[-2:]}])


def _trainer(tmp_path, student, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.distill import BlockDistillationTrainer

    tok = AutoTokenizer.from_pretrained(student)
    model = kw.pop("model", None) or AutoModelForCausalLM.from_pretrained(student)
    args = BlockDistillationConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False,
                                   save_strategy="no", **kw)
    return BlockDistillationTrainer(model, args, train_dataset=_dataset(), processing_class=tok), tok


def test_separate_teacher_gets_the_students_sink_initialisation(tmp_path):
    from transformers import AutoModelForCausalLM

    student = _checkpoint(tmp_path / "s", seed=0)
    # 1. the teacher is the student's own checkpoint: its sink row equals the student's initial one exactly
    trainer, tok = _trainer(tmp_path, student, teacher_model_name_or_path=student)
    sink = trainer.block_settings.sink_token_id
    assert sink == 6 and trainer.teacher_sink_initialised
    s_in, s_out = _rows(trainer.model, sink)
    t_in, t_out = _rows(trainer.teacher_model, sink)
    assert torch.equal(t_in, s_in) and torch.equal(t_out, s_out)
    ref = AutoModelForCausalLM.from_pretrained(student)
    assert torch.allclose(t_in, ref.get_input_embeddings().weight.mean(0), atol=1e-6)
    assert torch.allclose(t_out, ref.get_output_embeddings().weight.mean(0), atol=1e-6)
    assert trainer.teacher_model.training is False
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert isinstance(trainer.teacher_model, type(ref))  # placed by accelerate, not wrapped for training

    # 2. another teacher (other weights, embeddings padded past the tokenizer): the same rule on its own rows
    other = _checkpoint(tmp_path / "t", seed=1, vocab=16)
    trainer, _ = _trainer(tmp_path, student, teacher_model_name_or_path=other, sink_init="eos")
    ref = AutoModelForCausalLM.from_pretrained(other)
    t_in, t_out = _rows(trainer.teacher_model, sink)
    assert trainer.teacher_model.get_input_embeddings().weight.shape[0] == 16  # no resize needed
    assert torch.equal(t_in, ref.get_input_embeddings().weight[tok.eos_token_id])
    assert torch.equal(t_out, ref.get_output_embeddings().weight[tok.eos_token_id])

    # 3. a block-trained teacher (its config records this sink) keeps its trained row
    trained = _checkpoint(tmp_path / "b", seed=2, vocab=16, block_config={"sink_token_id": 6, "num_sinks": 4})
    trainer, _ = _trainer(tmp_path, student, teacher_model_name_or_path=trained)
    ref = AutoModelForCausalLM.from_pretrained(trained)
    assert not trainer.teacher_sink_initialised
    assert torch.equal(_rows(trainer.teacher_model, sink)[0], ref.get_input_embeddings().weight[6])


def test_teacher_sink_initialised_when_the_script_added_the_sink_first(tmp_path):
    """train/distill.py adds the sink token before building the trainer; the teacher still gets the rule."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = _checkpoint(tmp_path / "s", seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
    add_sink_token(tok, model)
    from vllm_blockattn.distill import BlockDistillationTrainer

    args = BlockDistillationConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, bf16=False,
                                   save_strategy="no", teacher_model_name_or_path=student)
    trainer = BlockDistillationTrainer(model, args, train_dataset=_dataset(), processing_class=tok)
    assert trainer.teacher_sink_initialised
    assert torch.equal(_rows(trainer.teacher_model, 6)[0], _rows(trainer.model, 6)[0])


def test_teacher_is_prepared_by_accelerate_in_evaluation_mode(tmp_path, monkeypatch):
    from accelerate import Accelerator

    calls = []
    real = Accelerator.prepare_model

    def spy(self, model, device_placement=None, evaluation_mode=False):
        calls.append((type(model).__name__, evaluation_mode))
        return real(self, model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    monkeypatch.setattr(Accelerator, "prepare_model", spy)
    student = _checkpoint(tmp_path / "s", seed=0)
    _trainer(tmp_path, student, teacher_model_name_or_path=student)
    assert ("Qwen3ForCausalLM", True) in calls  # the teacher: evaluation mode (no DDP wrapper, no optimizer)


def _launch_env(config_file):
    """What `accelerate launch --config_file <file>` puts in the environment of the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, "train/distill.py"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", ["accelerate_zero2.yaml", "accelerate_zero3.yaml", "accelerate_fsdp.yaml",
                                  "accelerate_multi_gpu.yaml"])
def test_distributed_launch_configs_construct(name, monkeypatch):
    """Construction only (no GPU here): the launch config parses and accelerate builds its plugin from the
    environment `accelerate launch` would set."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    args, env = _launch_env(os.path.join(CONFIGS, name))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if name.startswith("accelerate_zero"):
        plugin = DeepSpeedPlugin()
        stage = int(name[len("accelerate_zero")])
        assert plugin.zero_stage == stage
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
        if stage == 3:
            assert plugin.zero3_init_flag and env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    elif name == "accelerate_fsdp.yaml":
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward
        assert plugin.auto_wrap_policy is not None
    else:
        assert not args.use_deepspeed and not args.use_fsdp and args.multi_gpu


def test_fsdp_refuses_the_chunked_losses(tmp_path, monkeypatch):
    """Under FSDP the output head's sharded weight is gathered only inside the forward: the trainer asks for
    ``logit_chunk_size: 0`` instead of failing later."""
    from transformers import Trainer

    real = Trainer.create_accelerator_and_postprocess

    def fake_fsdp(self):
        real(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", fake_fsdp)
    student = _checkpoint(tmp_path / "s", seed=0)
    with pytest.raises(ValueError, match="logit_chunk_size"):
        _trainer(tmp_path, student, mode="block_finetune")
