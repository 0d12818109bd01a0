"""`BlockDistillationTrainer`: TRL's `SFTTrainer` with block distillation's loss (and the Ma et al. baseline).

One training step in ``mode="distill"`` (paper eq. (3); see docs/distillation.md):

1. teacher, no grad: full attention on the sink-free sequence, and the block pattern on the block sequence;
   their per-token losses on the response give the CE token weights (1 where block attention hurts the
   teacher by more than ``ce_tau``, ``ce_beta`` elsewhere);
2. student, block pattern (every context block alone): token-weighted CE on the response;
3. student, block-dropout pattern (a random subset of context blocks alone, everything else full causal):
   KL(teacher full || student) on the content tokens of the blocks that were not dropped and of the final
   block;
4. loss = CE + ``kl_weight`` * KL.

``mode="block_finetune"``: plain CE on the response under both the block and the full pattern.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from trl import SFTTrainer

from ..core.layout import DEFAULT_NUM_SINKS, parse_block_prompt
from ..core.reference import block_attention_mask, full_attention_mask
from .config import BlockDistillationConfig
from .data import BlockDataCollator, layout_from_lengths
from .losses import (block_finetune_loss, block_kl_loss, chunked_kl_loss, chunked_token_nll, token_nll,
                     token_weights, weighted_ce_loss)
from .masks import (batch_dropout_attention_masks, block_pattern_ids, flex_block_mask, full_pattern_ids,
                    kl_query_mask, pad_attention_masks, sample_dropped_blocks)
from .sinks import add_boundary_token, add_sink_token, apply_sink_peft, prepare_teacher_sink, write_block_config


def _load(model_or_path, init_kwargs: dict | None):
    if not isinstance(model_or_path, str):
        return model_or_path
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_or_path, **(init_kwargs or {}))


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@dataclass
class Pattern:
    """One attention pattern of a batch: token ids, positions, and the mask in both forms.

    ``doc``/``glob`` (``[B, L]``, see :mod:`.masks`) describe the mask without an ``[L, L]`` tensor and feed
    FlexAttention's ``BlockMask``; ``dense(dtype)`` builds the additive ``[B, 1, L, L]`` mask from the
    reference masks (eager/sdpa, and the reference the Flex path is tested against).
    """

    ids: torch.Tensor
    pos: torch.Tensor
    doc: torch.Tensor
    glob: torch.Tensor
    build_dense: object = field(repr=False)
    _dense: dict = field(default_factory=dict, repr=False)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._dense:
            self._dense[dtype] = self.build_dense(dtype)
        return self._dense[dtype]


def causal_lm(model):
    """The ``*ForCausalLM`` module under DDP/DeepSpeed (already unwrapped by the caller) and PEFT wrappers."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model):
    """The output head of a causal LM as a callable ``[n, H] -> [n, V]`` (final logit soft-capping included)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        return lambda h: torch.tanh(head(h) / cap) * cap
    return head


def uses_flex(model) -> bool:
    return getattr(causal_lm(model).config, "_attn_implementation", None) == "flex_attention"


class BlockDistillationTrainer(SFTTrainer):
    """Trains a student under block attention against a frozen full-attention teacher.

    Args:
        model: the student (a model or a checkpoint path). Its tokenizer gets the sink token if missing.
        args: a :class:`BlockDistillationConfig`.
        train_dataset: a ``datasets.Dataset`` of ``{"input_ids", "labels"}`` block samples
            (:class:`~vllm_blockattn.distill.data.ChatBlockFormatter`).
        processing_class: the tokenizer (required: it gets the sink token and is saved with the model).
        teacher_model: a model or path; default the student's initial weights (a frozen copy, or under
            PEFT the adapter-disabled base model). Unused in ``block_finetune`` mode.
        peft_config: a PEFT config; the sink row is made trainable through ``trainable_token_indices``.
        data_collator: defaults to :class:`~vllm_blockattn.distill.data.BlockDataCollator`.
        **kwargs: passed to ``SFTTrainer``.
    """

    _tag_names = ["trl", "sft", "block-attention", "block-distillation"]
    _name = "BlockDistillation"

    def __init__(self, model, args: BlockDistillationConfig, train_dataset=None, processing_class=None,
                 teacher_model=None, peft_config=None, data_collator=None, **kwargs):
        if not isinstance(args, BlockDistillationConfig):
            raise TypeError(f"args must be a BlockDistillationConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required: it receives the sink token")
        model = _load(model, args.model_init_kwargs)
        # num_sinks=0 (the "without sinks" ablation, Block-FT without sinks): the sink token is still added
        # (harmless, keeps the vocabulary alike across ablations) but no sample carries it (see
        # ChatBlockFormatter(sinks=False)); the checkpoint is saved in the sink-free layout, with a boundary
        # token the plugin uses to mark blocks and removes before attention.
        settings = add_sink_token(processing_class, model, sink_token=args.sink_token,
                                  num_sinks=args.num_sinks or DEFAULT_NUM_SINKS, init=args.sink_init)
        self.served_settings = settings
        if args.num_sinks == 0:
            self.served_settings = add_boundary_token(processing_class, model)
        elif peft_config is not None:
            apply_sink_peft(peft_config, settings)
        teacher = None
        self.teacher_sink_initialised = False
        if args.mode == "distill" and args.needs_teacher:
            teacher = _load(teacher_model or args.teacher_model_name_or_path, args.model_init_kwargs)
            if teacher is None and peft_config is None and _zero3_enabled():
                # A deep copy of a ZeRO-3-partitioned student would copy empty shards: load the student's own
                # checkpoint again (partitioned at load) and give it the student's sink initialisation.
                teacher = _load(model.config._name_or_path, args.model_init_kwargs)
            if teacher is None and peft_config is None:
                teacher = copy.deepcopy(model)  # before SFTTrainer patches the student's forward
            elif teacher is not None:
                # A separate teacher gets the student's sink initialisation rule (not a random/padding row).
                self.teacher_sink_initialised = prepare_teacher_sink(teacher, settings,
                                                                     getattr(model, "_block_sink_init", None))
                if self.served_settings.sink_free:  # the student's boundary row, so that the vocabularies match
                    add_boundary_token(processing_class, teacher)
        if data_collator is None:
            pad = processing_class.pad_token_id
            data_collator = BlockDataCollator(processing_class.eos_token_id if pad is None else pad, settings)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         processing_class=processing_class, peft_config=peft_config, **kwargs)
        self.block_settings = settings
        if self.is_fsdp_enabled and args.logit_chunk_size > 0:
            # The chunked losses call the output head outside the model's forward; FSDP only gathers the head's
            # sharded weight inside it (DeepSpeed ZeRO-3 gathers per module call, so it works there).
            raise ValueError("logit_chunk_size > 0 is not supported under FSDP: set logit_chunk_size: 0 (full "
                             "logits) or use DeepSpeed ZeRO-3 (train/configs/accelerate_zero3.yaml)")
        # The loss is a per-micro-batch mean: let Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.teacher_model = teacher
        if teacher is not None:
            self.teacher_model = self._prepare_teacher(teacher.eval().requires_grad_(False))
        peft_base = hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter")
        if args.needs_teacher and teacher is None and not peft_base:
            raise ValueError("no teacher: pass teacher_model, or use PEFT so the base model can serve as teacher")
        self._dropout_generator = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)
        self.teacher_cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.teacher_cache_seconds = 0.0
        if args.teacher_cache and train_dataset is not None:
            self.build_teacher_cache(train_dataset)

    def _prepare_teacher(self, teacher):
        """Place the frozen teacher the way TRL places reference/teacher models: DeepSpeed (ZeRO-3 shards it like
        the student; other stages run it unsharded, ZeRO disabled), FSDP (wrapped like the student), otherwise
        ``accelerator.prepare_model(evaluation_mode=True)`` (device placement, no DDP wrapper)."""
        from trl.models.utils import prepare_deepspeed, prepare_fsdp

        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # --- helpers --------------------------------------------------------------------------------------

    def _model_inputs(self, model, patterns: list[Pattern], dtype):
        ids = torch.cat([p.ids for p in patterns])
        pos = torch.cat([p.pos for p in patterns])
        if uses_flex(model):
            mask = flex_block_mask(torch.cat([p.doc for p in patterns]), torch.cat([p.glob for p in patterns]),
                                   self.args.flex_block_size)
        else:
            mask = torch.cat([p.dense(dtype) for p in patterns])
        return dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)

    def _logits(self, model, patterns: list[Pattern]) -> list[torch.Tensor]:
        """One forward over several attention patterns stacked on the batch axis (one call keeps DDP's
        reducer happy: a second forward of the wrapped model before backward is not allowed).

        Returns the logits ``[B, L, V]`` of each pattern (the full-logit reference path).
        """
        dtype = self.accelerator.unwrap_model(model).dtype
        logits = model(**self._model_inputs(self.accelerator.unwrap_model(model), patterns, dtype)).logits
        return list(logits.split([p.ids.shape[0] for p in patterns]))

    def _hidden(self, model, patterns: list[Pattern]) -> list[torch.Tensor]:
        """Like :meth:`_logits` but returns the final hidden states ``[B, L, H]`` of each pattern: the decoder's
        output is taken by a forward hook and the wrapped model computes the logits of one position only
        (``logits_to_keep=1``), so no ``[L, V]`` logits exist. The forward still goes through the wrapper
        (DDP, DeepSpeed, PEFT), so their hooks see it."""
        base = self.accelerator.unwrap_model(model)
        captured = []

        def hook(_module, _args, out):
            captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

        handle = causal_lm(base).get_decoder().register_forward_hook(hook)
        try:
            model(**self._model_inputs(base, patterns, base.dtype), logits_to_keep=1)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"expected one decoder output, captured {len(captured)}")
        return list(captured[0].split([p.ids.shape[0] for p in patterns]))

    def _teacher_context(self, model):
        """``(model to call, context manager)`` of the teacher: the separate frozen teacher, or the student's
        base model with its adapter disabled (PEFT)."""
        if self.teacher_model is not None:
            return self.teacher_model, contextlib.nullcontext
        base = self.accelerator.unwrap_model(model)
        return model, base.disable_adapter

    def _teacher_logits(self, model, patterns) -> list[torch.Tensor]:
        teacher, ctx = self._teacher_context(model)
        with torch.no_grad(), ctx():
            return self._logits(teacher, patterns)

    def _teacher_hidden(self, model, patterns):
        """Teacher hidden states of ``patterns`` and the teacher's output head (a callable that runs without
        gradient; under PEFT it disables the adapter around every call, since it is also called again while
        the student's chunked KL recomputes in the backward)."""
        teacher, ctx = self._teacher_context(model)
        with torch.no_grad(), ctx():
            hidden = self._hidden(teacher, patterns)
        head = output_head(self.accelerator.unwrap_model(teacher))

        def t_head(h):
            with torch.no_grad(), ctx():
                return head(h)

        return hidden, t_head

    def _patterns(self, inputs, dtype=None):
        """Layouts plus the block and full :class:`Pattern` of a batch, all at the block sequence's length L
        (the sink-free sequences are shorter and padded up to L)."""
        ids, lengths, cidx = inputs["input_ids"], inputs["lengths"].tolist(), inputs["content_index"]
        L, device = ids.shape[1], ids.device
        if "block_lengths" in inputs:  # samples without sinks carry their block boundaries
            layouts = [layout_from_lengths(x) for x in inputs["block_lengths"].tolist()]
        else:
            layouts = [parse_block_prompt(ids[i, :n].tolist(), self.block_settings) for i, n in enumerate(lengths)]
        pos = torch.zeros_like(ids)
        for i, lay in enumerate(layouts):
            pos[i, : lay.num_tokens] = torch.tensor(lay.positions(), device=device)
        doc, glob = (torch.stack(x) for x in zip(*(block_pattern_ids(lay, L, device=device) for lay in layouts)))
        block = Pattern(ids, pos, doc, glob, lambda dt: pad_attention_masks(
            [block_attention_mask(lay, dt, device) for lay in layouts], L))
        full_ids, full_labels = inputs["full_input_ids"], inputs["full_labels"]
        pad = L - full_ids.shape[1]
        full_ids = torch.nn.functional.pad(full_ids, (0, pad), value=self.data_collator.pad_token_id)
        full_labels = torch.nn.functional.pad(full_labels, (0, pad), value=-100)
        full_len = (cidx.max(dim=1).values + 1).tolist()
        fdoc, fglob = (torch.stack(x) for x in zip(*(full_pattern_ids(n, L, device) for n in full_len)))
        full = Pattern(full_ids, torch.arange(L, device=device).expand_as(ids), fdoc, fglob,
                       lambda dt: pad_attention_masks([full_attention_mask(n, dt, device) for n in full_len], L))
        return layouts, block, full, full_labels

    @staticmethod
    def _dropout_pattern(block: Pattern, layouts, dropped) -> Pattern:
        L, device = block.ids.shape[1], block.ids.device
        doc, glob = (torch.stack(x) for x in zip(*(block_pattern_ids(lay, L, d, device)
                                                   for lay, d in zip(layouts, dropped))))
        return Pattern(block.ids, block.pos, doc, glob,
                       lambda dt: batch_dropout_attention_masks(block.dense(dt), layouts, dropped))

    # --- teacher cache -------------------------------------------------------------------------------

    @staticmethod
    def _cache_key(ids: torch.Tensor) -> bytes:
        return ids.to("cpu", torch.long).numpy().tobytes()

    def _teacher_outputs(self, model, inputs, layouts, block, full, dtype):
        """The live teacher: CE token weights ``[B, L]`` and full-attention logits ``[B, L, V]`` (sink-free
        positions; ``t_full[b, content_index[b, t]]`` is the teacher's distribution at student position t)."""
        ids, labels, cidx = inputs["input_ids"], inputs["labels"], inputs["content_index"]
        t_full, t_block = self._teacher_logits(model, [full, block])
        t_full_nll = token_nll(t_full, full.ids).gather(1, cidx.clamp(min=0))  # on student positions
        weights = token_weights(token_nll(t_block, ids), t_full_nll, labels != -100, self.args.ce_tau,
                                self.args.ce_beta)
        return weights, t_full

    @torch.no_grad()
    def build_teacher_cache(self, dataset, batch_size: int | None = None) -> dict:
        """Run the frozen teacher once over ``dataset`` and keep, per sample (keyed by its token ids), the
        CE token weights ``[n]`` and the full-attention logits ``[n_full, V]`` (float32, CPU).

        Returns ``{"samples", "seconds", "bytes"}``; the seconds are also in ``self.teacher_cache_seconds``.
        """
        from tqdm.auto import tqdm

        if self.args.mode != "distill":
            raise ValueError(f"build_teacher_cache needs mode='distill', got {self.args.mode!r}")
        bs = batch_size or self.args.per_device_train_batch_size
        dtype = self.accelerator.unwrap_model(self.model).dtype
        device = self.accelerator.device
        cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        t0 = time.perf_counter()
        rows = list(range(len(dataset)))
        for start in tqdm(range(0, len(rows), bs), desc="teacher cache", disable=not self.is_local_process_zero()):
            batch = self.data_collator([dataset[i] for i in rows[start:start + bs]])
            batch = {k: v.to(device) for k, v in batch.items()}
            layouts, block, full, _ = self._patterns(batch)
            weights, t_full = self._teacher_outputs(self.model, batch, layouts, block, full, dtype)
            n_full = (batch["content_index"].max(dim=1).values + 1).tolist()
            for i, n in enumerate(batch["lengths"].tolist()):
                key = self._cache_key(batch["input_ids"][i, :n])
                cache[key] = (weights[i, :n].float().cpu().clone(), t_full[i, : n_full[i]].float().cpu().clone())
        self.teacher_cache = cache
        self.teacher_cache_seconds = time.perf_counter() - t0
        size = sum(w.numel() * 4 + x.numel() * 4 for w, x in cache.values())
        return {"samples": len(cache), "seconds": self.teacher_cache_seconds, "bytes": size}

    def _cached_teacher(self, inputs):
        """Cached ``(weights [B, L], per-row full logits)`` of a batch, or None if any sample is missing."""
        if not self.teacher_cache:
            return None
        ids = inputs["input_ids"]
        hits = [self.teacher_cache.get(self._cache_key(ids[i, :n])) for i, n in enumerate(inputs["lengths"].tolist())]
        if any(h is None for h in hits):
            return None
        weights = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        for i, (w, _) in enumerate(hits):
            weights[i, : w.shape[0]] = w.to(ids.device)
        return weights, [x.to(ids.device) for _, x in hits]

    # --- loss -----------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        layouts, block, full, full_labels = self._patterns(inputs)
        metrics = self._metrics[mode]
        if self.args.mode == "block_finetune":
            loss = (self._finetune_loss_chunked if self.args.logit_chunk_size > 0 else self._finetune_loss_full)(
                model, inputs, block, full, full_labels, metrics)
            metrics["ce"].append(loss.item())
        else:
            cached = self._cached_teacher(inputs)
            if self.teacher_cache is not None:
                metrics["teacher_cache_hit"].append(float(cached is not None))
            dropped = None
            if self.args.kl_weight > 0:
                if self.args.block_dropout:
                    dropped = [sample_dropped_blocks(lay, self.args.block_dropout_rate, self._dropout_generator)
                               for lay in layouts]
                else:  # ablation: the KL runs on the plain block pattern (every context block alone)
                    dropped = [tuple(range(len(lay.context_blocks))) for lay in layouts]
                n_ctx = sum(len(lay.context_blocks) for lay in layouts)
                metrics["dropped_fraction"].append(sum(map(len, dropped)) / max(1, n_ctx))
            step = self._distill_loss_chunked if self.args.logit_chunk_size > 0 else self._distill_loss_full
            ce, kl, hard, full_kl = step(model, inputs, layouts, block, full, dropped, cached, metrics)
            loss = ce + self.args.kl_weight * kl + self.args.full_kl_weight * full_kl
            metrics["ce"].append(ce.item())
            if dropped is not None:
                metrics["kl"].append(kl.item())
            if self.args.full_kl_weight > 0:
                metrics["full_kl"].append(full_kl.item())
            metrics["hard_token_fraction"].append(hard)
        if mode == "eval" and self.args.eval_block_metrics:
            self._eval_metrics(model, inputs, layouts, block, full, full_labels, metrics)
        return (loss, SimpleNamespace(logits=None)) if return_outputs else loss

    @torch.no_grad()
    def _eval_metrics(self, model, inputs, layouts, block, full, full_labels, metrics):
        """Evaluation only: what the student does at inference.

        - ``block_accuracy``: greedy next-token accuracy on the response under the block pattern;
        - ``full_accuracy``: the same under full attention on the sink-free sequence (does the student keep
          its full-attention ability?);
        - ``block_kl``: KL(teacher full || student block) on the final block's content positions (the
          student's plain block pattern, every context block alone), in distill mode.
        One extra no-grad forward of the student (block + full stacked) and, for ``block_kl``, of the teacher's
        full pattern (or the teacher cache), through the output heads in chunks.
        """
        ids, labels, cidx = inputs["input_ids"], inputs["labels"], inputs["content_index"]
        chunk = self.args.logit_chunk_size or 1024
        hs_block, hs_full = self._hidden(model, [block, full])
        head = output_head(self.accelerator.unwrap_model(model))

        def accuracy(hidden, b, t, targets):
            if targets.numel() == 0:
                return 0.0
            pred = torch.cat([head(h).argmax(-1) for h in hidden[b, t - 1].split(chunk)])
            return (pred == targets).float().mean().item()

        rb, rt = (labels != -100).nonzero(as_tuple=True)
        fb, ft = (full_labels != -100).nonzero(as_tuple=True)
        metrics["block_accuracy"].append(accuracy(hs_block, rb, rt, ids[rb, rt]))
        metrics["full_accuracy"].append(accuracy(hs_full, fb, ft, full.ids[fb, ft]))
        if self.args.mode != "distill" or not self.args.needs_teacher:
            return
        all_dropped = [tuple(range(len(lay.context_blocks))) for lay in layouts]
        b, t = self._kl_positions(layouts, all_dropped, ids)
        cached = self._cached_teacher(inputs)
        if cached is None:
            (th_full,), t_head = self._teacher_hidden(model, [full])
            kl = chunked_kl_loss(hs_block[b, t], head, th_full[b, cidx[b, t]], t_head, self.args.kl_temperature, chunk)
        else:
            teacher_q = torch.cat([cached[1][i][cidx[i, t[b == i]]] for i in range(ids.shape[0])])
            kl = chunked_kl_loss(hs_block[b, t], head, teacher_q, None, self.args.kl_temperature, chunk)
        metrics["block_kl"].append(kl.item())

    def _kl_positions(self, layouts, dropped, ids):
        kl_q = torch.zeros_like(ids, dtype=torch.bool)
        for i, (lay, d) in enumerate(zip(layouts, dropped)):
            kl_q[i, : lay.num_tokens] = kl_query_mask(lay, d).to(ids.device)
        return kl_q.nonzero(as_tuple=True)  # row by row

    def _student_patterns(self, block, layouts, dropped, full):
        """The student's patterns of one step: block (CE), dropout (KL; the block pattern itself without block
        dropout), full (the optional full-pattern KL); with ``ce_pattern="dropout"`` the dropout pattern serves
        both CE and KL. Returns the list to forward and a function mapping the outputs to ``(CE pattern,
        dropout or None, full or None)``."""
        drop_own = dropped is not None and self.args.block_dropout
        one = drop_own and self.args.ce_pattern == "dropout"  # CE and KL on the dropout pattern: one forward
        pats = [self._dropout_pattern(block, layouts, dropped)] if one else [block]
        if drop_own and not one:
            pats.append(self._dropout_pattern(block, layouts, dropped))
        fkl = self.args.full_kl_weight > 0
        if fkl:
            pats.append(full)

        def split(outs):
            s_drop = outs[1] if drop_own and not one else (outs[0] if dropped is not None else None)
            return outs[0], s_drop, outs[-1] if fkl else None

        return pats, split

    def _full_kl_positions(self, inputs):
        """``(b, p)``: positions of the sink-free sequences that predict a next token of the same sequence."""
        n_full = inputs["content_index"].max(dim=1).values + 1
        p = torch.arange(inputs["input_ids"].shape[1], device=n_full.device)
        return (p[None] < (n_full[:, None] - 1)).nonzero(as_tuple=True)

    def _distill_loss_full(self, model, inputs, layouts, block, full, dropped, cached, metrics):
        """Reference path: full ``[B, L, V]`` logits of every forward."""
        ids, labels, cidx = inputs["input_ids"], inputs["labels"], inputs["content_index"]
        response = labels != -100
        dtype = self.accelerator.unwrap_model(model).dtype
        fkl = self.args.full_kl_weight > 0
        if cached is None:
            if self.args.use_token_weights:
                weights, t_full = self._teacher_outputs(model, inputs, layouts, block, full, dtype)
            else:  # ablation: plain CE; the teacher runs its full pattern only, and only for a KL
                t_full = self._teacher_logits(model, [full])[0] if dropped is not None or fkl else None
        else:
            weights, t_rows = cached
        if not self.args.use_token_weights:
            weights = response.float()
        pats, split = self._student_patterns(block, layouts, dropped, full)
        s_block, s_drop, s_full = split(self._logits(model, pats))
        kl = full_kl = torch.zeros((), device=ids.device)
        if dropped is not None:
            b, t = self._kl_positions(layouts, dropped, ids)
            if cached is None:
                teacher_q = t_full[b, cidx[b, t]]
            else:
                teacher_q = torch.cat([t_rows[i][cidx[i, t[b == i]]] for i in range(ids.shape[0])])
            kl = block_kl_loss(s_drop[b, t], teacher_q, self.args.kl_temperature)
        if fkl:
            b, p = self._full_kl_positions(inputs)
            teacher_q = t_full[b, p] if cached is None else torch.cat(
                [t_rows[i][p[b == i]] for i in range(ids.shape[0])])
            full_kl = block_kl_loss(s_full[b, p], teacher_q, self.args.kl_temperature)
        ce = weighted_ce_loss(token_nll(s_block, ids), weights, response, self.args.ce_normalization)
        hard = ((weights == 1) & response).sum().item() / max(1, response.sum().item())
        return ce, kl, hard, full_kl

    def _distill_loss_chunked(self, model, inputs, layouts, block, full, dropped, cached, metrics):
        """Memory-lean path: final hidden states, and losses through the output heads in chunks of
        ``logit_chunk_size`` rows, only at the rows that enter a loss (response tokens for the CE and the token
        weights, KL positions for the KL). Equal to :meth:`_distill_loss_full` (tested)."""
        ids, labels, cidx = inputs["input_ids"], inputs["labels"], inputs["content_index"]
        chunk, T = self.args.logit_chunk_size, self.args.kl_temperature
        fkl = self.args.full_kl_weight > 0
        rb, rt = (labels != -100).nonzero(as_tuple=True)  # response tokens; predicted from position rt - 1
        targets = ids[rb, rt]
        t_hidden = t_head = None
        if cached is None and self.args.use_token_weights:
            (th_full, th_block), t_head = self._teacher_hidden(model, [full, block])
            t_full_nll = chunked_token_nll(th_full[rb, cidx[rb, rt] - 1], t_head, targets, chunk)
            t_block_nll = chunked_token_nll(th_block[rb, rt - 1], t_head, targets, chunk)
            weights = token_weights(t_block_nll, t_full_nll, torch.ones_like(targets, dtype=torch.bool),
                                    self.args.ce_tau, self.args.ce_beta)
            t_hidden = th_full
        elif cached is None:  # ablation: plain CE; the teacher runs its full pattern only, and only for a KL
            if dropped is not None or fkl:
                (t_hidden,), t_head = self._teacher_hidden(model, [full])
        else:
            weights = cached[0][rb, rt]
        if not self.args.use_token_weights:
            weights = torch.ones_like(targets, dtype=torch.float32)
        s_head = output_head(self.accelerator.unwrap_model(model))
        pats, split = self._student_patterns(block, layouts, dropped, full)
        hs_block, hs_drop, hs_full = split(self._hidden(model, pats))

        def teacher_rows(b, pos):  # the teacher at full-sequence positions: hidden states (live) or cached logits
            if cached is None:
                return t_hidden[b, pos], t_head
            return torch.cat([cached[1][i][pos[b == i]] for i in range(ids.shape[0])]), None

        kl = full_kl = torch.zeros((), device=ids.device)
        if dropped is not None:
            b, t = self._kl_positions(layouts, dropped, ids)
            kl = chunked_kl_loss(hs_drop[b, t], s_head, *teacher_rows(b, cidx[b, t]), T, chunk)
        if fkl:
            b, p = self._full_kl_positions(inputs)
            full_kl = chunked_kl_loss(hs_full[b, p], s_head, *teacher_rows(b, p), T, chunk)
        s_nll = chunked_token_nll(hs_block[rb, rt - 1], s_head, targets, chunk)
        ce = weighted_ce_loss(s_nll, weights, torch.ones_like(weights, dtype=torch.bool), self.args.ce_normalization)
        hard = (weights == 1).sum().item() / max(1, targets.numel())
        return ce, kl, hard, full_kl

    def _finetune_loss_full(self, model, inputs, block, full, full_labels, metrics):
        s_block, s_full = self._logits(model, [block, full])
        return block_finetune_loss(token_nll(s_block, inputs["input_ids"]), token_nll(s_full, full.ids),
                                   inputs["labels"] != -100, full_labels != -100)

    def _finetune_loss_chunked(self, model, inputs, block, full, full_labels, metrics):
        chunk = self.args.logit_chunk_size
        hs_block, hs_full = self._hidden(model, [block, full])
        head = output_head(self.accelerator.unwrap_model(model))
        rb, rt = (inputs["labels"] != -100).nonzero(as_tuple=True)
        fb, ft = (full_labels != -100).nonzero(as_tuple=True)
        nll = torch.cat([chunked_token_nll(hs_block[rb, rt - 1], head, block.ids[rb, rt], chunk),
                         chunked_token_nll(hs_full[fb, ft - 1], head, full.ids[fb, ft], chunk)])
        return nll.sum() / max(1, nll.numel())

    # --- saving ---------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        out = output_dir or self.args.output_dir
        if os.path.exists(os.path.join(out, "config.json")):
            write_block_config(out, self.served_settings)


class BlockFinetuneTrainer(BlockDistillationTrainer):
    """The block fine-tuning baseline of Ma et al. (ICLR 2025): ``BlockDistillationTrainer`` in
    ``mode="block_finetune"`` (plain CE under both the block and the full pattern, no teacher)."""

    _name = "BlockFinetune"

    def __init__(self, model, args: BlockDistillationConfig, **kwargs):
        if args.mode != "block_finetune":
            raise ValueError(f"BlockFinetuneTrainer needs args.mode='block_finetune', got {args.mode!r}")
        super().__init__(model, args, **kwargs)
