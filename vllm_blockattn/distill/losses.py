"""Loss terms of block distillation, as static functions tested alone on tiny tensors.

Paper: "Towards Generalization of Block Attention via Automatic Segmentation and Block Distillation"
(arXiv 2605.15913). Eq. (3) defines the total objective

    L = L_wCE(student, block pattern) + lambda * KL(teacher_full || student_dropout)

whose terms are computed below. Index convention: ``nll[b, t]`` is the loss of *token* t (predicted
from position t-1), so it lines up with HF-style ``labels`` (``labels[b, t] == input_ids[b, t]`` on the
response, -100 elsewhere).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def _generalized_jsd_loss():
    """TRL's `GKDTrainer.generalized_jsd_loss` (in `trl.experimental`, which warns on import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood.

    Args:
        logits: ``[B, L, V]``, position t predicting token t+1.
        input_ids: ``[B, L]``.

    Returns:
        ``[B, L]`` float32: ``out[:, t] = -log p(input_ids[:, t] | tokens < t)`` for t >= 1, 0 at t = 0.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree")
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return F.pad(nll, (1, 0))


def token_weights(teacher_block_nll: torch.Tensor, teacher_full_nll: torch.Tensor, response_mask: torch.Tensor,
                  tau: float, beta: float) -> torch.Tensor:
    """Token weights of the weighted CE (the paper's token-weighting rule).

    A response token gets weight 1 when block attention hurts the teacher on it,
    ``teacher_block_nll - teacher_full_nll > tau``, and ``beta`` otherwise; non-response tokens get 0.

    Args:
        teacher_block_nll, teacher_full_nll: ``[B, L]`` per-token NLL (:func:`token_nll` indexing) of the
            teacher under the block and the full pattern, aligned on the student's token positions.
        response_mask: ``[B, L]`` bool, the response tokens (``labels != -100``).

    Returns:
        ``[B, L]`` float32 weights, detached.
    """
    hard = (teacher_block_nll - teacher_full_nll).detach() > tau
    w = torch.where(hard, torch.ones_like(teacher_block_nll), torch.full_like(teacher_block_nll, beta))
    return (w * response_mask).float()


CE_NORMALIZATIONS = ("tokens", "weights")


def weighted_ce_loss(student_nll: torch.Tensor, weights: torch.Tensor, response_mask: torch.Tensor,
                     normalization: str = "tokens") -> torch.Tensor:
    """Token-weighted CE.

    ``normalization="tokens"`` (the paper's reading: the weights "shrink the loss scale" of the
    insensitive tokens to ``beta``) divides by the number of response tokens, so the loss, and with it
    the step size, is smaller than plain CE's whenever tokens are easy: up to ``1/beta`` times
    smaller. ``"weights"`` divides by the sum of the weights, a weighted mean on plain CE's scale:
    only the mix of tokens changes, which separates the weighting from its effect on the learning
    rate in an ablation against plain CE.

    Args:
        student_nll: ``[B, L]`` per-token NLL of the student's block-attention forward.
        weights: ``[B, L]`` from :func:`token_weights` (0 off the response).
        response_mask: ``[B, L]`` bool.
        normalization: ``"tokens"`` or ``"weights"``.

    Returns:
        scalar: ``sum(weights * student_nll) / max(1, sum(response_mask))`` (tokens) or
        ``/ sum(weights)`` (weights; 0 when no token has weight).
    """
    total = (weights * student_nll).sum()
    if normalization == "tokens":
        return total / response_mask.sum().clamp(min=1)
    if normalization == "weights":
        return total / weights.sum().clamp(min=1e-8)
    raise ValueError(f"normalization must be one of {CE_NORMALIZATIONS}, got {normalization!r}")


def block_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per selected position, averaged over positions.

    Uses TRL's ``generalized_jsd_loss`` with ``beta=0``: TRL computes ``F.kl_div(student_log_probs,
    teacher_log_probs)`` there, i.e. ``sum_v p_T (log p_T - log p_S)`` = the *forward* KL(teacher || student)
    (``beta=1`` would be the reverse KL(student || teacher)).

    Args:
        student_logits: ``[K, V]``, the student's dropout-forward logits at the K KL positions.
        teacher_logits: ``[K, V]``, the teacher's full-attention logits at the same positions.

    Returns:
        scalar (0 when K == 0).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} disagree")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    labels = torch.zeros(1, student_logits.shape[0], dtype=torch.long, device=student_logits.device)
    return _generalized_jsd_loss()(student_logits[None].float(), teacher_logits[None].float(), labels=labels,
                                   beta=0.0, temperature=temperature, reduction="batchmean")


def block_finetune_loss(block_nll: torch.Tensor, full_nll: torch.Tensor, block_response: torch.Tensor,
                        full_response: torch.Tensor) -> torch.Tensor:
    """Block fine-tuning baseline (Ma et al., ICLR 2025): plain CE over the response tokens of both the
    block-pattern and the full-pattern copy of every sample.

    Args:
        block_nll, block_response: ``[B, L]`` NLL and response mask of the block-pattern forward.
        full_nll, full_response: ``[B, Lf]`` the same for the full-pattern (sink-free) forward.
    """
    total = (block_nll * block_response).sum() + (full_nll * full_response).sum()
    return total / (block_response.sum() + full_response.sum()).clamp(min=1)


# --- chunked losses from hidden states (the memory-lean path) -----------------------------------------
#
# The full-logit path above needs [B, L, V] logits per forward (fp32 once upcast): at 8k tokens and a
# 151k vocabulary that is ~5 GB per sequence. The functions below take final hidden states ``[N, H]``
# and the output head (a module or any callable ``[n, H] -> [n, V]``) and go through the head ``chunk_size``
# rows at a time. Each chunk runs under ``torch.utils.checkpoint`` (non-reentrant), so its logits are freed
# after the forward and recomputed in the backward: at most one ``[chunk_size, V]`` fp32 logit block (plus
# its softmax) is alive at a time, whatever N is. Calling the head module (not its weight) keeps PEFT
# wrappers, tied embeddings and ZeRO-3 parameter gathering working.

def _checkpointed(fn, *args):
    from torch.utils.checkpoint import checkpoint

    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def chunked_token_nll(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """``[N]`` float32 NLL of ``targets [N]`` under ``head(hidden) [N, V]``, ``chunk_size`` rows at a time.

    Equals ``F.cross_entropy(head(hidden).float(), targets, reduction="none")`` in value and gradient
    (tested); the caller picks the rows (e.g. the positions before the response tokens).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, H] and targets {tuple(targets.shape)} [N]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    def nll(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="none")

    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0.0
    return torch.cat([_checkpointed(nll, h, y) for h, y in zip(hidden.split(chunk_size), targets.split(chunk_size))])


def chunked_kl_loss(student_hidden: torch.Tensor, student_head, teacher: torch.Tensor, teacher_head=None,
                    temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """KL(teacher || student) averaged over K positions, from hidden states, ``chunk_size`` rows at a time.

    Args:
        student_hidden: ``[K, H]`` the student's final hidden states at the KL positions.
        student_head: the student's output head.
        teacher: ``[K, H_t]`` the teacher's hidden states at the same positions (with ``teacher_head``), or
            ``[K, V]`` teacher logits (``teacher_head=None``, e.g. the teacher cache).
        teacher_head: the teacher's output head (run without gradient), or None.

    Equals :func:`block_kl_loss` on the full logits (value and gradient; tested). Per chunk it reuses TRL's
    ``generalized_jsd_loss`` (``beta=0``, ``reduction="sum"``); the teacher chunk is recomputed in the
    backward with the student's (no teacher logits are kept across chunks).
    """
    K = student_hidden.shape[0]
    if teacher.shape[0] != K:
        raise ValueError(f"student has {K} positions but teacher {teacher.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if K == 0:
        return student_hidden.sum() * 0.0
    jsd = _generalized_jsd_loss()
    teacher = teacher.detach()

    def kl(h, t):
        s_logits = student_head(h).float()
        with torch.no_grad():
            t_logits = (teacher_head(t) if teacher_head is not None else t).float()
        return jsd(s_logits[None], t_logits[None], beta=0.0, temperature=temperature, reduction="sum")

    total = sum(_checkpointed(kl, h, t) for h, t in zip(student_hidden.split(chunk_size), teacher.split(chunk_size)))
    return total / K
