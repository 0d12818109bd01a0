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
        synthetic_num_samples / synthetic_num_docs / synthetic_facts_per_doc / synthetic_seed: the
            synthetic set's size and shape.
        tiny_hidden_size / tiny_num_layers: shape of the tiny model when ``model_name_or_path`` is
            ``tiny:qwen3`` or ``tiny:llama`` (built on the fly under ``<output_dir>/base``).
        merge_peft: merge a LoRA adapter into the saved checkpoint (a plain HF directory).
    """

    dataset_name: str = field(default="synthetic", metadata={"help": "'synthetic' or a jsonl path."})
    dataset_format: str = field(default="auto", metadata={"help": "'hotpotqa', 'chatqa2' or 'auto'."})
    segmenter: str = field(default="paragraphs",
                           metadata={"help": "'paragraphs', 'learned', 'learned:<checkpoint>' or 'module:function'."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    synthetic_num_samples: int = field(default=256, metadata={"help": "Synthetic samples."})
    synthetic_num_docs: int = field(default=4, metadata={"help": "Documents (context blocks) per synthetic sample."})
    synthetic_facts_per_doc: int = field(default=3, metadata={"help": "Facts per synthetic document."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set."})
    tiny_hidden_size: int = field(default=128, metadata={"help": "Hidden size of a tiny:<arch> model."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Layers of a tiny:<arch> model."})
    merge_peft: bool = field(default=True, metadata={"help": "Merge LoRA into the saved checkpoint."})


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


def load_training_records(script_args: DistillScriptArguments) -> list[dict]:
    from vllm_blockattn.distill.data import load_records, load_segmenter, make_retrieval_records

    if script_args.dataset_name == "synthetic":
        return make_retrieval_records(script_args.synthetic_num_samples, num_docs=script_args.synthetic_num_docs,
                                      facts_per_doc=script_args.synthetic_facts_per_doc,
                                      seed=script_args.synthetic_seed)
    return load_records(script_args.dataset_name, script_args.dataset_format, load_segmenter(script_args.segmenter))


def main(script_args: DistillScriptArguments, training_args, model_args: ModelConfig) -> str:
    """Train and save; returns the checkpoint directory."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_blockattn.distill import BlockDistillationTrainer
    from vllm_blockattn.distill.data import ChatBlockFormatter
    from vllm_blockattn.distill.sinks import add_sink_token, write_block_config

    from accelerate import PartialState

    with PartialState().main_process_first():  # a tiny model is built once, then read by every rank
        path = resolve_model(model_args.model_name_or_path, training_args.output_dir, script_args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto",
                                                 attn_implementation=model_args.attn_implementation or "sdpa")
    settings = add_sink_token(tokenizer, model, sink_token=training_args.sink_token,
                              num_sinks=training_args.num_sinks, init=training_args.sink_init)
    formatter = ChatBlockFormatter(tokenizer, settings, system=script_args.system_prompt,
                                   max_length=training_args.max_length)
    records = load_training_records(script_args)
    samples = [s for s in map(formatter, records) if s is not None]
    if not samples:
        raise ValueError(f"no sample fits max_length={training_args.max_length}")
    peft_config = get_peft_config(model_args)
    trainer = BlockDistillationTrainer(model, training_args, train_dataset=Dataset.from_list(samples),
                                       processing_class=tokenizer, peft_config=peft_config)
    trainer.train()

    out = training_args.output_dir
    if peft_config is not None and script_args.merge_peft:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(out)
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(out)
    if trainer.accelerator.is_main_process:
        write_block_config(out, settings)
    trainer.accelerator.wait_for_everyone()
    return out


if __name__ == "__main__":
    from vllm_blockattn.distill import BlockDistillationConfig

    parser = TrlParser((DistillScriptArguments, BlockDistillationConfig, ModelConfig))
    main(*parser.parse_args_and_config())
