"""The block sink token: add it to the tokenizer and the model, initialise it, keep it trainable, record it.

A distilled checkpoint is a plain Hugging Face directory whose ``config.json`` carries
``"block_attention": {"sink_token_id": ..., "num_sinks": ...}``; the vLLM plugin and the reference read
their settings from there.
"""

from __future__ import annotations

import json
import os

import torch

from ..core.layout import BOUNDARY_TOKEN, CONFIG_KEY, DEFAULT_NUM_SINKS, SINK_TOKEN, BlockSettings


def add_sink_token(tokenizer, model, *, sink_token: str = SINK_TOKEN, num_sinks: int = DEFAULT_NUM_SINKS,
                   init: str = "mean") -> BlockSettings:
    """Make ``sink_token`` a special token of ``tokenizer`` with a usable embedding row in ``model``.

    A missing token is added as a special token; the embeddings grow only when its id does not fit (many
    checkpoints pad the embedding matrix beyond the tokenizer). A new row is initialised from the rows of
    the tokens that existed before (``"mean"``), from the EOS row (``"eos"``) or left as is (``"keep"``);
    input and (untied) output rows alike. A token that already exists is left untouched.
    ``model.config.block_attention`` is set to the returned settings. When the token is added, the rule is
    recorded on the model (``model._block_sink_init``) so that a separately loaded teacher gets the same
    initialisation (:func:`prepare_teacher_sink`).

    Returns:
        The :class:`BlockSettings` (sink id, ``num_sinks``).
    """
    if init not in ("mean", "eos", "keep"):
        raise ValueError(f"init must be 'mean', 'eos' or 'keep', got {init!r}")
    old_len = len(tokenizer)
    added = sink_token not in tokenizer.get_vocab()
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": [sink_token]}, replace_extra_special_tokens=False)
    settings = BlockSettings.from_tokenizer(tokenizer, sink_token=sink_token, num_sinks=num_sinks)
    sink_id = settings.sink_token_id
    if sink_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(sink_id + 1, mean_resizing=False)
    if added and init != "keep":
        init_sink_rows(model, sink_id, old_len, init, tokenizer.eos_token_id)
    set_block_config(model.config, settings)
    if added:  # what a separately loaded teacher needs to get the same initialisation (prepare_teacher_sink)
        model.__dict__["_block_sink_init"] = {"added": True, "num_existing": old_len, "init": init,
                                              "eos_token_id": tokenizer.eos_token_id}
    return settings


def add_boundary_token(tokenizer, model=None, *, boundary_token: str = BOUNDARY_TOKEN) -> BlockSettings:
    """The sink-free layout's marker for a checkpoint trained without sinks (``num_sinks: 0``, e.g. a
    Block-FT model): make ``boundary_token`` a special token of ``tokenizer`` and return the settings
    ``{"num_sinks": 0, "boundary_token_id": ...}``.

    The boundary is removed before attention, so its embedding row is never read; the embeddings of
    ``model`` (if given) grow only when the id does not fit, and the new rows are set to the mean row so that
    the checkpoint stays finite everywhere. ``model.config.block_attention`` is set to the settings.
    """
    if boundary_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [boundary_token]}, replace_extra_special_tokens=False)
    settings = BlockSettings.from_tokenizer(tokenizer, num_sinks=0, boundary_token=boundary_token)
    if model is not None:
        old = model.get_input_embeddings().weight.shape[0]
        if settings.boundary_token_id >= old:
            model.resize_token_embeddings(settings.boundary_token_id + 1, mean_resizing=False)
            with torch.no_grad():
                for emb in _embedding_matrices(model):
                    emb[old:] = emb[:old].float().mean(0).to(emb.dtype)
        set_block_config(model.config, settings)
    return settings


def make_sink_free_checkpoint(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                              boundary_token: str = BOUNDARY_TOKEN) -> BlockSettings:
    """Make the checkpoint at ``path`` (trained without sinks) servable by the blockattn backend: add the
    boundary token to its tokenizer and write ``{"num_sinks": 0, "boundary_token_id": ...}`` into
    ``config.json``, in place or into ``out``. The weights are loaded (and their embeddings grown) only
    when the tokenizer has no spare id inside the embedding matrix; otherwise only the tokenizer and
    ``config.json`` are written (weights copied as they are when ``out`` is given)."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    out = str(out or path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    rows = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size")
    settings = add_boundary_token(tokenizer)
    if settings.boundary_token_id >= rows:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        add_boundary_token(tokenizer, model, boundary_token=boundary_token)
        model.save_pretrained(out)
    elif out != str(path):
        shutil.copytree(path, out, dirs_exist_ok=True)
    tokenizer.save_pretrained(out)
    write_block_config(out, settings)
    return settings


def init_sink_rows(model, sink_id: int, num_existing: int, init: str, eos_token_id: int | None = None) -> None:
    """Set the sink row of the input and (untied) output embeddings of ``model``: the mean of the first
    ``num_existing`` rows (the tokens that existed before the sink, ``"mean"``) or a copy of the EOS row
    (``"eos"``)."""
    if init not in ("mean", "eos"):
        raise ValueError(f"init must be 'mean' or 'eos', got {init!r}")
    if init == "eos" and eos_token_id is None:
        raise ValueError("sink init 'eos' needs a tokenizer with an eos token")
    with torch.no_grad():
        for emb in _embedding_matrices(model):
            src = emb[:num_existing].float().mean(0) if init == "mean" else emb[eos_token_id]
            emb[sink_id] = src.to(emb.dtype)


def prepare_teacher_sink(teacher, settings: BlockSettings, sink_init: dict | None) -> bool:
    """Give a separately loaded teacher a usable sink row before its block-pattern pass (which feeds the CE
    token weights): the same initialisation rule as the student's, on the teacher's own embeddings.

    ``sink_init`` is what :func:`add_sink_token` recorded for the student (``added``, ``num_existing``,
    ``init``, ``eos_token_id``). The embeddings grow when the sink id does not fit. The row is initialised
    when the student's was (the sink token was new and ``init`` is not ``"keep"``), unless the teacher's own
    config already records block-attention settings with this sink id (a block-trained teacher keeps its
    trained row). Returns whether the row was initialised.
    """
    if teacher.get_input_embeddings().weight.shape[0] <= settings.sink_token_id:
        teacher.resize_token_embeddings(settings.sink_token_id + 1, mean_resizing=False)
    own = getattr(teacher.config, CONFIG_KEY, None)
    if isinstance(own, dict) and own.get("sink_token_id") == settings.sink_token_id:
        return False
    if not sink_init or not sink_init.get("added") or sink_init.get("init") == "keep":
        return False
    init_sink_rows(teacher, settings.sink_token_id, sink_init["num_existing"], sink_init["init"],
                   sink_init.get("eos_token_id"))
    return True


def _embedding_matrices(model) -> list[torch.Tensor]:
    mats = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != mats[0].data_ptr():
        mats.append(out.weight)
    return mats


def set_block_config(config, settings: BlockSettings) -> None:
    """Record the settings on a model config (saved with it when the config class keeps extra keys)."""
    setattr(config, CONFIG_KEY, settings.to_dict())


def write_block_config(path: str | os.PathLike, settings: BlockSettings) -> None:
    """Make sure ``path/config.json`` holds the ``block_attention`` entry (some config classes drop extras)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} does not exist; save the model before writing its block settings")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get(CONFIG_KEY) != settings.to_dict():
        cfg[CONFIG_KEY] = settings.to_dict()
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)


def apply_sink_peft(peft_config, settings: BlockSettings, embedding_module: str = "embed_tokens"):
    """Keep the sink row trainable under LoRA: add it to ``peft_config.trainable_token_indices`` (PEFT's
    trainable-token adapter trains and saves that row only, not the whole embedding matrix). In place;
    returns ``peft_config``."""
    idx = peft_config.trainable_token_indices
    if idx is None:
        idx = {}
    elif isinstance(idx, list):
        idx = {embedding_module: list(idx)}
    rows = list(idx.get(embedding_module, []))
    if settings.sink_token_id not in rows:
        rows.append(settings.sink_token_id)
    idx[embedding_module] = rows
    peft_config.trainable_token_indices = idx
    return peft_config


def main(argv=None) -> None:
    """``python -m vllm_blockattn.distill.sinks add-boundary MODEL_DIR [--out DIR]``: prepare a checkpoint
    trained without sinks (Block-FT) for ``vllm serve MODEL --attention-backend blockattn``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vllm_blockattn.distill.sinks",
                                 description="Block-attention token helpers for checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-boundary", help="add the sink-free layout's boundary token to a checkpoint "
                                              "trained without sinks and record it in config.json")
    add.add_argument("model", help="checkpoint directory")
    add.add_argument("--out", help="write a copy here instead of editing in place")
    add.add_argument("--boundary-token", default=BOUNDARY_TOKEN)
    a = ap.parse_args(argv)
    settings = make_sink_free_checkpoint(a.model, a.out, boundary_token=a.boundary_token)
    print(f"{a.out or a.model}: config.json {CONFIG_KEY} = {settings.to_dict()}")


if __name__ == "__main__":
    main()
