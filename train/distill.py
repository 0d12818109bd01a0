"""Block distillation entry point (TRL-style script).

Runs unchanged on one CPU, one GPU or several GPUs::

    # CPU, tiny model built on the fly, synthetic data (a minute)
    accelerate launch --cpu --num_processes 1 train/distill.py --config train/configs/tiny_cpu.yaml
    python train/distill.py --config train/configs/tiny_cpu.yaml          # same, without accelerate

    # one GPU, Qwen3-4B-Instruct-2507 + LoRA on HotpotQA-style jsonl
    accelerate launch train/distill.py --config train/configs/qwen3_4b_gpu.yaml

    # several GPUs (DDP; or DeepSpeed ZeRO-2 with train/configs/accelerate_zero2.yaml)
    accelerate launch --config_file train/configs/accelerate_multi_gpu.yaml \\
        train/distill.py --config train/configs/qwen3_4b_gpu.yaml

Any field of the yaml can be overridden on the command line (``--learning_rate 1e-5``). The output
directory is a plain Hugging Face checkpoint (LoRA merged) whose ``config.json`` has the
``block_attention`` entry, so the vLLM plugin serves it in block mode with no further settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config


@dataclass
class DistillScriptArguments:
    """Data and model-building arguments of train/distill.py.

    Args:
        dataset_name: ``"synthetic"`` (the generated retrieval set) or a jsonl path.
        dataset_format: ``"hotpotqa"``, ``"chatqa2"`` or ``"auto"``.
        segmenter: how long documents become blocks: ``"paragraphs"``, ``"learned"`` /
            ``"learned:<checkpoint>"`` (the learned segmenter) or ``"package.module:function"``.
        system_prompt: optional system message in the chat template.
        enable_thinking: handed to chat templates that read it (Qwen3's). False (the default): the
            template closes an empty ``<think></think>`` in the generation prompt and the labelled response is
            the answer alone, as the model is evaluated with thinking off; True: the generation prompt is left
            open and the empty think block becomes part of the labelled response (the training data has no
            reasoning text either way). Templates that do not mention it format the same either way.
        synthetic_num_samples / synthetic_num_docs / synthetic_facts_per_doc / synthetic_seed: the
            synthetic set's size and shape.
        tiny_hidden_size / tiny_num_layers: shape of the tiny model when ``model_name_or_path`` is
            ``tiny:qwen3`` or ``tiny:llama`` (built on the fly under ``<output_dir>/base``).
        merge_peft: merge a LoRA adapter into the saved checkpoint (a plain HF directory).
        eval_dataset_name: a held-out jsonl (same formats) or ``"synthetic"`` (a synthetic set with another
            seed); ``eval_fraction``: hold out this fraction of the training records instead (seeded by
            ``synthetic_seed``). Evaluation runs at ``eval_strategy``/``eval_steps`` and logs the loss terms plus
            block/full-attention accuracy and block KL.
        metrics_file: append every log record to ``<output_dir>/metrics.jsonl``.
    """

    dataset_name: str = field(default="synthetic", metadata={"help": "'synthetic' or a jsonl path."})
    dataset_format: str = field(default="auto", metadata={"help": "'hotpotqa', 'chatqa2' or 'auto'."})
    segmenter: str = field(default="paragraphs",
                           metadata={"help": "'paragraphs', 'learned', 'learned:<checkpoint>' or 'module:function'."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    enable_thinking: bool = field(default=False, metadata={
        "help": "Chat templates that read it (Qwen3): False renders an empty think block before the response."})
    synthetic_num_samples: int = field(default=256, metadata={"help": "Synthetic samples."})
    synthetic_num_docs: int = field(default=4, metadata={"help": "Documents (context blocks) per synthetic sample."})
    synthetic_facts_per_doc: int = field(default=3, metadata={"help": "Facts per synthetic document."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set."})
    tiny_hidden_size: int = field(default=128, metadata={"help": "Hidden size of a tiny:<arch> model."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Layers of a tiny:<arch> model."})
    merge_peft: bool = field(default=True, metadata={"help": "Merge LoRA into the saved checkpoint."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Held-out jsonl or 'synthetic'."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Fraction of the training records held out."})
    eval_max_samples: int = field(default=512, metadata={"help": "At most this many held-out samples."})
    metrics_file: bool = field(default=True, metadata={"help": "Write <output_dir>/metrics.jsonl."})


def resolve_model(name: str, output_dir: str, script_args: DistillScriptArguments) -> str:
    """A checkpoint path; ``tiny:<arch>`` builds a random tiny model under ``<output_dir>/base``."""
    if not name:
        raise ValueError("model_name_or_path is required")
    if not name.startswith("tiny:"):
        return name
    from vllm_blockattn.tiny import build_tiny_model

    path = os.path.join(output_dir, "base")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_tiny_model(path, name.split(":", 1)[1], hidden_size=script_args.tiny_hidden_size,
                         num_layers=script_args.tiny_num_layers)
    return path


def _load(name: str, script_args: DistillScriptArguments, seed: int) -> list[dict]:
    from vllm_blockattn.distill.data import load_records, load_segmenter, make_retrieval_records

    if name == "synthetic":
        return make_retrieval_records(script_args.synthetic_num_samples, num_docs=script_args.synthetic_num_docs,
                                      facts_per_doc=script_args.synthetic_facts_per_doc, seed=seed)
    return load_records(name, script_args.dataset_format, load_segmenter(script_args.segmenter))


def load_training_records(script_args: DistillScriptArguments) -> list[dict]:
    return _load(script_args.dataset_name, script_args, script_args.synthetic_seed)


def split_records(script_args: DistillScriptArguments) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` records: ``eval_dataset_name`` if given, else a seeded ``eval_fraction`` hold-out."""
    import random

    train = load_training_records(script_args)
    if script_args.eval_dataset_name:
        held = _load(script_args.eval_dataset_name, script_args, script_args.synthetic_seed + 1)
    elif script_args.eval_fraction > 0:
        if not 0 < script_args.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {script_args.eval_fraction}")
        order = list(range(len(train)))
        random.Random(script_args.synthetic_seed).shuffle(order)
        n = max(1, int(round(len(train) * script_args.eval_fraction)))
        held, train = [train[i] for i in order[:n]], [train[i] for i in order[n:]]
    else:
        held = []
    return train, held[: script_args.eval_max_samples]


def resolve_resume(value, output_dir: str):
    """``--resume_from_checkpoint``: a checkpoint directory, or ``true``/``last`` for the newest
    ``checkpoint-*`` under ``output_dir`` (None when there is none yet, so a first run starts fresh)."""
    if value in (None, "", False, "false", "False", "no"):
        return None
    if value in (True, "true", "True", "last", "yes"):
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if not os.path.isdir(value):
        raise FileNotFoundError(f"resume_from_checkpoint {value!r} is not a directory")
    return value


def _usable_report_to(report_to):
    """Drop TensorBoard from ``report_to`` (with a warning) when it is not installed, instead of failing."""
    import importlib.util
    import warnings

    items = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "tensorboard" in items and importlib.util.find_spec("tensorboard") is None \
            and importlib.util.find_spec("tensorboardX") is None:
        warnings.warn("report_to tensorboard: tensorboard is not installed (pip install tensorboard); logging to "
                      "<output_dir>/metrics.jsonl and trainer_state.json only")
        items = [x for x in items if x != "tensorboard"]
    return [x for x in items if x != "none"]


def main(script_args: DistillScriptArguments, training_args, model_args: ModelConfig) -> str:
    """Train and save; returns the checkpoint directory."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.distill import BlockDistillationTrainer
    from vllm_blockattn.distill.callbacks import MetricsFileCallback
    from vllm_blockattn.distill.data import ChatBlockFormatter
    from vllm_blockattn.distill.sinks import add_sink_token, write_block_config
    from vllm_blockattn.core.layout import DEFAULT_NUM_SINKS

    from accelerate import PartialState

    with PartialState().main_process_first():  # a tiny model is built once, then read by every rank
        path = resolve_model(model_args.model_name_or_path, training_args.output_dir, script_args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto",
                                                 attn_implementation=model_args.attn_implementation or "sdpa")
    settings = add_sink_token(tokenizer, model, sink_token=training_args.sink_token,
                              num_sinks=training_args.num_sinks or DEFAULT_NUM_SINKS, init=training_args.sink_init)
    sinks = training_args.num_sinks > 0  # 0: the without-sinks ablation (blocks travel as block_lengths)
    formatter = ChatBlockFormatter(tokenizer, settings, system=script_args.system_prompt,
                                   max_length=training_args.max_length, sinks=sinks,
                                   enable_thinking=script_args.enable_thinking)
    records, held = split_records(script_args)
    samples = [s for s in map(formatter, records) if s is not None]
    if not samples:
        raise ValueError(f"no sample fits max_length={training_args.max_length}")
    eval_samples = [s for s in map(formatter, held) if s is not None]
    peft_config = get_peft_config(model_args)
    training_args.report_to = _usable_report_to(training_args.report_to)
    callbacks = [MetricsFileCallback()] if script_args.metrics_file else []
    trainer = BlockDistillationTrainer(model, training_args, train_dataset=Dataset.from_list(samples),
                                       eval_dataset=Dataset.from_list(eval_samples) if eval_samples else None,
                                       processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir))
    if eval_samples:
        trainer.evaluate()

    out = training_args.output_dir
    if peft_config is not None and script_args.merge_peft:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(out)
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(out)
    if trainer.accelerator.is_main_process:  # sink settings, or the sink-free layout's boundary token
        write_block_config(out, trainer.served_settings)
    trainer.accelerator.wait_for_everyone()
    return out


if __name__ == "__main__":
    from vllm_blockattn.distill import BlockDistillationConfig

    parser = TrlParser((DistillScriptArguments, BlockDistillationConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
