"""Distillation losses: Hinton et al. 2015 (teacher soft targets) and Anil et al. 2018 (codistillation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_core.errors import ConfigError


def _soft_term(student_logits: Tensor, teacher_probs: Tensor, kind: str, temperature: float) -> Tensor:
    """Batch-mean CE or KL between fixed target probabilities and softmax(student / T)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    if kind == "ce":
        return -(teacher_probs * log_q).sum(dim=-1).mean()
    if kind == "kl":
        # xlogy keeps 0 * log 0 = 0 for targets that are exactly zero.
        return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q).sum(dim=-1).mean()
    raise ConfigError(f"soft loss must be 'kl' or 'ce', got {kind!r}")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    *,
    temperature: float,
    alpha: float,
    soft_loss: str = "kl",
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (total, hard, soft) with total = alpha * T^2 * soft + (1 - alpha) * hard.

    `soft` is the unscaled CE or KL between softmax(teacher/T) and softmax(student/T). Its gradient
    per student logit is (q - p) / T, so the T^2 factor keeps the soft term's gradient scale about
    the same whatever T is (Hinton et al., section 2). Without labels (an unlabeled transfer set)
    the hard term is zero and total = T^2 * soft.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    student_logits = student_logits.float()
    teacher_probs = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    soft = _soft_term(student_logits, teacher_probs, soft_loss, temperature)
    t2 = temperature * temperature
    if labels is None:
        hard = student_logits.new_zeros(())
        return t2 * soft, hard, soft
    hard = F.cross_entropy(student_logits, labels)
    if alpha <= 0.0:
        total = hard  # plain cross entropy; skips 0 * soft, which would be NaN for an inf soft term
    elif alpha >= 1.0:
        total = t2 * soft
    else:
        total = alpha * t2 * soft + (1.0 - alpha) * hard
    return total, hard, soft


def codistillation_loss(logits: Tensor, peer_logits: list[Tensor] | Tensor, *, loss: str = "ce") -> Tensor:
    """Distillation term towards the peers' average prediction (no gradient flows into the peers).

    `peer_logits` is a list of [B, C] tensors, one [B, C] tensor (a single peer), or a stacked
    [P, B, C] tensor. "ce" and "kl" target the mean of the peers' softmax; "mse" targets the mean
    of their logits.
    """
    if isinstance(peer_logits, Tensor):
        peers = peer_logits.unsqueeze(0) if peer_logits.dim() == logits.dim() else peer_logits
    else:
        if len(peer_logits) == 0:
            raise ConfigError("codistillation needs at least one peer")
        peers = torch.stack(list(peer_logits))
    peers = peers.detach().float()
    logits = logits.float()
    if loss == "mse":
        return F.mse_loss(logits, peers.mean(dim=0))
    if loss in ("ce", "kl"):
        target = F.softmax(peers, dim=-1).mean(dim=0)
        return _soft_term(logits, target, loss, 1.0)
    raise ConfigError(f"codistillation loss must be 'ce', 'kl' or 'mse', got {loss!r}")
