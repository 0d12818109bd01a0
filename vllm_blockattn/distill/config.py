"""Training configuration of block distillation, in TRL's dataclass style (``GKDConfig(SFTConfig)``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..core.layout import DEFAULT_NUM_SINKS, SINK_TOKEN

MODES = ("distill", "block_finetune")
SINK_INITS = ("mean", "eos", "keep")


@dataclass
class BlockDistillationConfig(SFTConfig):
    r"""Configuration of [`BlockDistillationTrainer`]: only what block distillation adds to `SFTConfig`.

    Args:
        mode (`str`, *optional*, defaults to `"distill"`):
            `"distill"`: block distillation (token-weighted CE on the student's block-attention forward plus
            `kl_weight` x KL(teacher full || student block-dropout), paper eq. (3)). `"block_finetune"`: the
            Ma et al. (ICLR 2025) baseline, plain CE on every sample under both the block and the full pattern.
        sink_token (`str`, *optional*, defaults to `"<|block_sink|>"`):
            The block sink token, added to the tokenizer as a special token when missing.
        num_sinks (`int`, *optional*, defaults to `4`):
            Sinks before every block (k). Written to `config.json` under `block_attention`. `0` is the paper's
            "without sinks" ablation: samples carry no sink groups (their block boundaries travel as
            `block_lengths`), no `block_attention` entry is written, and the checkpoint cannot be served in block
            mode by the plugin (the token ids no longer mark the blocks); evaluate it with explicit layouts.
        sink_init (`str`, *optional*, defaults to `"mean"`):
            How a newly added sink row is initialised: `"mean"` of the existing input (and output) embedding
            rows, `"eos"` a copy of the EOS row, `"keep"` leave what `resize_token_embeddings` gave. An existing
            sink token is never re-initialised.
        block_dropout_rate (`float`, *optional*, defaults to `0.6`):
            Probability that a context block is encoded alone in the student's dropout forward; the other
            blocks and the final block keep full causal attention.
        kl_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the KL term in the total loss.
        kl_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of both distributions in the KL term.
        ce_tau (`float`, *optional*, defaults to `0.1`):
            Threshold tau (nats): a response token gets CE weight 1 when the teacher's loss on it under block
            attention exceeds its loss under full attention by more than tau, else `ce_beta`.
        ce_beta (`float`, *optional*, defaults to `0.1`):
            CE weight of the response tokens the teacher already handles under block attention.
        ce_pattern (`str`, *optional*, defaults to `"block"`):
            The student attention pattern the CE is computed on. `"block"` (default) is the plain block pattern:
            with block dropout on, the student runs two forwards per step (block for the CE, dropout for the KL).
            `"dropout"` computes the CE on the dropout pattern too, so one student forward carries both terms: the
            reading of the paper under which block distillation is cheaper per step than block fine-tuning (which
            runs a block and a full forward). Without block dropout both settings run one forward.
        ce_normalization (`str`, *optional*, defaults to `"tokens"`):
            `"tokens"` divides the weighted CE by the number of response tokens (the paper's reading: weights
            shrink the easy tokens' loss, and so the loss scale); `"weights"` divides by the sum of the weights
            (a weighted mean on plain CE's scale), which separates token weighting from its effect on the
            effective learning rate when ablating against plain CE.
        use_token_weights (`bool`, *optional*, defaults to `True`):
            `False` is the "without token weights" ablation: plain CE on every response token (weight 1), and the
            teacher's block-pattern pass is skipped.
        block_dropout (`bool`, *optional*, defaults to `True`):
            `False` is the "without block dropout" ablation: the KL runs on the student's plain block pattern
            (every context block alone, so only the final block's positions enter it) instead of a random
            dropout pattern; one student forward serves both terms. (`block_dropout_rate` is then unused.)
            "Without KL" is `kl_weight: 0`.
        full_kl_weight (`float`, *optional*, defaults to `0.0`):
            An extra term (not in the paper): `full_kl_weight` x KL(teacher full || student full) on the
            sink-free sequence under full causal attention, to keep the student's full-attention behaviour
            (one more student pattern in the same forward).
        teacher_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            A separate teacher checkpoint. `None`: the student's initial weights, frozen (a copy; under PEFT the
            adapter-disabled base model, at no memory cost).
        teacher_cache (`bool`, *optional*, defaults to `False`):
            Run the frozen teacher once per training sample before training (both of its patterns) and keep, per
            sample, its full-attention logits over the whole vocabulary (float32, on the CPU) and the CE token
            weights; every step then reads them instead of running the teacher. Exact: the teacher is frozen and
            neither output depends on the student or on the dropout draw. Memory: 4 bytes x vocabulary size x
            the sink-free length of every sample, so only for small vocabularies or small datasets. Samples not
            in the cache (e.g. the evaluation set) use the live teacher.
        logit_chunk_size (`int`, *optional*, defaults to `1024`):
            Memory-lean losses: the trainer takes the models' final hidden states and computes every loss term
            (weighted CE, token weights, KL) through the output head `logit_chunk_size` rows at a time, only at
            the rows that enter a loss, each chunk under activation checkpointing; no `[L, V]` logit tensor is
            materialised. `0`: the reference path (full `[B, L, V]` logits of every forward). Both give the same
            loss and gradients (tested).
        flex_block_size (`int`, *optional*, defaults to `128`):
            Tile size of the FlexAttention `BlockMask` built from block ids when the model runs with
            `attn_implementation="flex_attention"` (otherwise dense additive masks are used).
        eval_block_metrics (`bool`, *optional*, defaults to `True`):
            During evaluation also log `block_accuracy` and `full_accuracy` (greedy next-token accuracy on the
            response under the block pattern and under full attention) and `block_kl` (KL(teacher full ||
            student block) on the final block): one extra no-grad student forward (and teacher forward).
    """

    mode: str = field(default="distill", metadata={"help": f"Training mode, one of {MODES}."})
    sink_token: str = field(default=SINK_TOKEN, metadata={"help": "The block sink token (added when missing)."})
    num_sinks: int = field(default=DEFAULT_NUM_SINKS, metadata={"help": "Sink tokens before every block."})
    sink_init: str = field(default="mean", metadata={"help": f"Init of a new sink row, one of {SINK_INITS}."})
    block_dropout_rate: float = field(
        default=0.6, metadata={"help": "Probability that a context block is encoded alone in the dropout forward."}
    )
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of KL(teacher full || student dropout)."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term."})
    ce_tau: float = field(
        default=0.1,
        metadata={"help": "Teacher block-minus-full loss (nats) above which a response token gets weight 1."},
    )
    ce_beta: float = field(default=0.1, metadata={"help": "CE weight of the other response tokens."})
    use_token_weights: bool = field(default=True, metadata={"help": "Token-weighted CE; False = plain CE."})
    ce_pattern: str = field(
        default="block",
        metadata={"help": "Student pattern of the CE: block (a second student forward besides the dropout "
                          "pattern's) or dropout (CE and KL on one forward)."},
    )
    ce_normalization: str = field(
        default="tokens",
        metadata={"help": "Divide the weighted CE by the response tokens (the paper's reading) or by the sum of "
                          "the weights (plain CE's scale, for ablations): tokens | weights."},
    )
    block_dropout: bool = field(
        default=True, metadata={"help": "KL on a block-dropout pattern; False = on the plain block pattern."}
    )
    full_kl_weight: float = field(
        default=0.0, metadata={"help": "Weight of an extra KL(teacher full || student full) term (0 = off)."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher checkpoint; None = the student's initial weights, frozen."}
    )
    teacher_cache: bool = field(
        default=False,
        metadata={"help": "Precompute the teacher's full logits and CE token weights once per training sample."},
    )

    logit_chunk_size: int = field(
        default=1024,
        metadata={"help": "Rows per chunk of the hidden-state losses through the output head; 0 = full logits."},
    )
    flex_block_size: int = field(default=128, metadata={"help": "Tile size of FlexAttention BlockMasks."})
    eval_block_metrics: bool = field(
        default=True, metadata={"help": "Log block/full-attention accuracy and block KL during evaluation."}
    )

    def __post_init__(self):
        # Block samples carry their own tokenisation and layout: SFTTrainer must not re-tokenise or drop columns.
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self.remove_unused_columns = False
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.sink_init not in SINK_INITS:
            raise ValueError(f"sink_init must be one of {SINK_INITS}, got {self.sink_init!r}")
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0 (0: the without-sinks ablation), got {self.num_sinks}")
        if not 0.0 <= self.block_dropout_rate <= 1.0:
            raise ValueError(f"block_dropout_rate must be in [0, 1], got {self.block_dropout_rate}")
        if self.full_kl_weight < 0:
            raise ValueError(f"full_kl_weight must be >= 0, got {self.full_kl_weight}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}")
        if self.ce_pattern not in ("block", "dropout"):
            raise ValueError(f"ce_pattern must be 'block' or 'dropout', got {self.ce_pattern!r}")
        if self.ce_normalization not in ("tokens", "weights"):
            raise ValueError(f"ce_normalization must be 'tokens' or 'weights', got {self.ce_normalization!r}")
        if not 0.0 <= self.ce_beta <= 1.0:
            raise ValueError(f"ce_beta must be in [0, 1], got {self.ce_beta}")
        if self.teacher_cache and self.mode == "distill" and not self.needs_teacher:
            raise ValueError("teacher_cache needs a teacher: kl_weight > 0 or use_token_weights")
        if self.teacher_cache and self.mode != "distill":
            raise ValueError(f"teacher_cache needs mode='distill' (there is no teacher in {self.mode!r})")
        if self.logit_chunk_size < 0:
            raise ValueError(f"logit_chunk_size must be >= 0, got {self.logit_chunk_size}")
        if self.flex_block_size < 16 or self.flex_block_size % 16:
            raise ValueError(f"flex_block_size must be a positive multiple of 16, got {self.flex_block_size}")
        if self.padding_free or self.packing:
            raise ValueError("padding_free and packing are not supported: every sample carries its own 4D block mask")

    @property
    def needs_teacher(self) -> bool:
        """Distillation without KL and without token weights is plain block CE: no teacher is built."""
        return self.mode == "distill" and (self.kl_weight > 0 or self.use_token_weights or self.full_kl_weight > 0)
