"""Distillation losses: Hinton et al. 2015, DKD (Zhao et al. 2022), DIST (Huang et al. 2022), logit
standardisation (Sun et al. 2024), and codistillation (Anil et al. 2018)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_core.config import METHOD_OPTIONS, METHODS
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


# --------------------------------------------------------------------------- DKD, DIST, standardisation


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Sun et al. 2024: z-score each sample's logits (mean 0, unbiased std 1) before the temperature.

    The student then matches the teacher's logit *relations*, not their range. One class has no spread:
    its logits are returned centred (all zero).
    """
    logits = logits.float()
    centred = logits - logits.mean(dim=-1, keepdim=True)
    if logits.shape[-1] < 2:
        return centred
    return centred / (logits.std(dim=-1, keepdim=True) + eps)


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) from probabilities p and log-probabilities; 0 * log 0 = 0 (also where q is 0 too)."""
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Zhao et al. 2022, eq. 4: (TCKD, NCKD), batch means, each already multiplied by T^2.

    TCKD = KL(b^T || b^S) over the binary (target, all others) probabilities; NCKD = KL(p̂^T || p̂^S)
    over the non-target classes renormalised among themselves. Computed in log space, so a student
    probability that underflows never gives log 0 (mdistiller's float32 log does).
    """
    if labels is None:
        raise ConfigError("DKD needs labels: it splits each sample's classes into its label and the rest")
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    target = F.one_hot(labels, s.shape[-1]).bool()
    log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    minus_inf = torch.tensor(float("-inf"), device=s.device)

    def binary(log_p: Tensor) -> Tensor:  # [log p_target, log (1 - p_target)]
        gt = log_p.gather(1, labels[:, None])
        rest = torch.logsumexp(torch.where(target, minus_inf, log_p), dim=-1, keepdim=True)
        return torch.cat([gt, rest], dim=1)

    bs, bt = binary(log_ps), binary(log_pt)
    tckd = _kl_rows(bt.exp(), bt, bs).mean()
    # Non-target classes only: the target's logit is removed (-inf), the others renormalised.
    ns = F.log_softmax(torch.where(target, minus_inf, s), dim=-1)
    nt = F.log_softmax(torch.where(target, minus_inf, t), dim=-1)
    nckd = _kl_rows(nt.exp(), nt, ns).mean() if s.shape[-1] > 1 else s.new_zeros(())
    t2 = temperature * temperature
    return t2 * tckd, t2 * nckd


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a with the same row of b (a constant row correlates 0)."""
    return F.cosine_similarity(
        a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True), dim=1, eps=eps
    )


def dist_terms(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Huang et al. 2022, eqs. 8-9: (inter-class, intra-class) relation losses, each times T^2.

    Inter: 1 - Pearson correlation between each sample's student and teacher class probabilities,
    averaged over the batch. Intra: the same per class, across the batch's samples (a class absent
    from a batch still has a probability column). A batch of one sample has no intra-class relation:
    that term is 0 (the config refuses batch_size < 2, so only a last short batch can be that small).
    """
    ys = F.softmax(student_logits.float() / temperature, dim=-1)
    yt = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    t2 = temperature * temperature
    inter = 1.0 - _pearson_rows(ys, yt).mean()
    intra = 1.0 - _pearson_rows(ys.T, yt.T).mean() if ys.shape[0] > 1 else ys.new_zeros(())
    return t2 * inter, t2 * intra


def method_options(method: str, options: dict[str, float] | None = None) -> dict[str, float]:
    """A method's options with the paper's defaults filled in."""
    if method not in METHOD_OPTIONS:
        raise ConfigError(f"'method' must be one of {', '.join(METHODS)}; got {method!r}")
    return {**METHOD_OPTIONS[method], **(options or {})}


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    *,
    method: str = "hinton",
    options: dict[str, float] | None = None,
    temperature: float,
    alpha: float,
    soft_loss: str = "kl",
    logit_standardization: bool = False,
    epoch: float = 0.0,
    covered: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, hard, soft) for one batch under `method`; `hard` is CE on the raw student logits.

    - hinton: `distillation_loss` (total = alpha T^2 soft + (1 - alpha) hard; `soft` unscaled).
    - dkd: total = ce_weight hard + min(epoch / warmup_epochs, 1) (alpha TCKD + beta NCKD); `soft` is
      the second term as added. The config's `alpha` is not used (DKD's own alpha is an option).
    - dist: total = ce_weight hard + beta inter + gamma intra; `soft` is the relation term as added.
    `logit_standardization` z-scores both models' logits for the soft term (hinton, dkd).
    `covered` (bool per sample; soft-label teachers) marks the samples with a teacher prediction:
    the others contribute only their cross entropy (weight 1); the batch mean is over all samples.
    """
    opts = method_options(method, options)
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    student_logits = student_logits.float()
    if covered is not None and not bool(covered.all()):
        return _partly_covered(
            student_logits, teacher_logits, labels, covered, method=method, options=opts,
            temperature=temperature, alpha=alpha, soft_loss=soft_loss,
            logit_standardization=logit_standardization, epoch=epoch,
        )  # fmt: skip
    s_soft, t_soft = student_logits, teacher_logits.detach().float()
    if logit_standardization:
        s_soft, t_soft = standardize(s_soft), standardize(t_soft)
    if method == "hinton":
        if not logit_standardization:
            return distillation_loss(
                student_logits, t_soft, labels, temperature=temperature, alpha=alpha, soft_loss=soft_loss
            )
        # The soft term sees standardised logits, the hard term the raw ones.
        _, _, soft = distillation_loss(
            s_soft, t_soft, None, temperature=temperature, alpha=1.0, soft_loss=soft_loss
        )
        t2 = temperature * temperature
        if labels is None:
            return t2 * soft, student_logits.new_zeros(()), soft
        hard = F.cross_entropy(student_logits, labels)
        return alpha * t2 * soft + (1.0 - alpha) * hard, hard, soft
    if labels is None and method == "dkd":
        raise ConfigError(
            "method 'dkd' needs labels; this dataset (a transfer set) has none: use hinton or dist"
        )
    hard = F.cross_entropy(student_logits, labels) if labels is not None else student_logits.new_zeros(())
    if method == "dkd":
        tckd, nckd = dkd_terms(s_soft, t_soft, labels, temperature)
        warmup = opts["warmup_epochs"]
        ramp = min(epoch / warmup, 1.0) if warmup > 0 else 1.0
        soft = ramp * (opts["alpha"] * tckd + opts["beta"] * nckd)
    else:
        inter, intra = dist_terms(s_soft, t_soft, temperature)
        soft = opts["beta"] * inter + opts["gamma"] * intra
    return opts["ce_weight"] * hard + soft, hard, soft


def _partly_covered(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, covered: Tensor, **kw: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """A batch where only `covered` samples have teacher logits: the method on those, CE on the rest."""
    n = student_logits.shape[0]
    rest = ~covered
    if labels is None:
        raise ConfigError("samples without a teacher prediction need labels; this set has none")
    ce_rest = F.cross_entropy(student_logits[rest], labels[rest], reduction="sum") / n
    hard = F.cross_entropy(student_logits, labels)
    k = int(covered.sum())
    if k == 0:
        return ce_rest, hard, student_logits.new_zeros(())
    total, _, soft = kd_loss(student_logits[covered], teacher_logits[covered], labels[covered], **kw)
    return total * (k / n) + ce_rest, hard, soft
