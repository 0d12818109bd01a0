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


def weighted_ce_loss(student_nll: torch.Tensor, weights: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token-weighted CE, normalised by the number of response tokens (not by the weights' sum, so that
    ``beta`` really scales the easy tokens down).

    Args:
        student_nll: ``[B, L]`` per-token NLL of the student's block-attention forward.
        weights: ``[B, L]`` from :func:`token_weights`.
        response_mask: ``[B, L]`` bool.

    Returns:
        scalar: ``sum(weights * student_nll) / max(1, sum(response_mask))``.
    """
    return (weights * student_nll).sum() / response_mask.sum().clamp(min=1)


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
