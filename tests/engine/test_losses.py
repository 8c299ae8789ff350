"""Distillation and codistillation losses against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_core.errors import ConfigError
from kd_core.losses import codistillation_loss, distillation_loss


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 4.0]]
LABELS = [1, 2]


def _hand(t: float, alpha: float, kind: str) -> tuple[float, float, float]:
    soft = 0.0
    hard = 0.0
    for s, te, y in zip(STUDENT, TEACHER, LABELS):
        p = _softmax(te, t)
        q = _softmax(s, t)
        if kind == "kl":
            soft += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        else:
            soft += -sum(pi * math.log(qi) for pi, qi in zip(p, q))
        hard += -math.log(_softmax(s)[y])
    soft /= len(STUDENT)
    hard /= len(STUDENT)
    return alpha * t * t * soft + (1 - alpha) * hard, hard, soft


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("t,alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 0.3)])
def test_distillation_loss_matches_hand_computation(kind, t, alpha):
    total, hard, soft = distillation_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(LABELS),
        temperature=t,
        alpha=alpha,
        soft_loss=kind,
    )
    want_total, want_hard, want_soft = _hand(t, alpha, kind)
    assert soft.item() == pytest.approx(want_soft, rel=1e-5)
    assert hard.item() == pytest.approx(want_hard, rel=1e-5)
    # The T^2 factor is part of total, not of soft.
    assert total.item() == pytest.approx(want_total, rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy_and_alpha_one_has_no_hard_term():
    s, te, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    total, _, _ = distillation_loss(s, te, y, temperature=4.0, alpha=0.0)
    assert total.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    total, _, soft = distillation_loss(s, te, y, temperature=3.0, alpha=1.0)
    assert total.item() == pytest.approx(9.0 * soft.item(), rel=1e-6)
    # Changing the labels does not change an alpha=1 loss.
    other, _, _ = distillation_loss(s, te, torch.tensor([0, 0]), temperature=3.0, alpha=1.0)
    assert other.item() == pytest.approx(total.item(), rel=1e-6)


def test_no_labels_means_soft_only():
    s, te = torch.tensor(STUDENT), torch.tensor(TEACHER)
    total, hard, soft = distillation_loss(s, te, None, temperature=2.0, alpha=0.5)
    assert hard.item() == 0.0
    assert total.item() == pytest.approx(4.0 * soft.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_soft_gradient_is_q_minus_p_over_t(kind):
    """Hinton et al. 2015, eq. 2: dC/dz_i = (q_i - p_i) / T for the (unscaled) soft cross entropy."""
    t = 3.0
    z = torch.tensor(STUDENT, requires_grad=True)
    v = torch.tensor(TEACHER)
    _, _, soft = distillation_loss(z, v, None, temperature=t, alpha=1.0, soft_loss=kind)
    (soft * z.shape[0]).backward()  # undo the batch mean: the formula is per example
    q = F.softmax(z.detach() / t, dim=-1)
    p = F.softmax(v / t, dim=-1)
    torch.testing.assert_close(z.grad, (q - p) / t, rtol=1e-5, atol=1e-7)


def test_teacher_gets_no_gradient():
    z = torch.tensor(STUDENT, requires_grad=True)
    v = torch.tensor(TEACHER, requires_grad=True)
    total, _, _ = distillation_loss(z, v, torch.tensor(LABELS), temperature=2.0, alpha=0.7)
    total.backward()
    assert v.grad is None and z.grad is not None


def test_bad_soft_loss_is_a_config_error():
    with pytest.raises(ConfigError):
        distillation_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), None, temperature=1.0, alpha=1.0, soft_loss="x"
        )


PEER_A = [[0.0, 1.0, 2.0], [1.0, 1.0, -1.0]]
PEER_B = [[2.0, 0.0, 1.0], [-2.0, 0.5, 0.5]]


def _avg_target():
    return [[(a + b) / 2 for a, b in zip(_softmax(ra), _softmax(rb))] for ra, rb in zip(PEER_A, PEER_B)]


def test_codistillation_ce_and_kl_match_hand_computation():
    target = _avg_target()
    ce = kl = 0.0
    for s, p in zip(STUDENT, target):
        q = _softmax(s)
        ce += -sum(pi * math.log(qi) for pi, qi in zip(p, q))
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    peers = [torch.tensor(PEER_A), torch.tensor(PEER_B)]
    got_ce = codistillation_loss(torch.tensor(STUDENT), peers, loss="ce")
    got_kl = codistillation_loss(torch.tensor(STUDENT), peers, loss="kl")
    assert got_ce.item() == pytest.approx(ce / 2, rel=1e-5)
    assert got_kl.item() == pytest.approx(kl / 2, rel=1e-5)
    # A stacked [P, B, C] tensor means the same peers.
    stacked = codistillation_loss(torch.tensor(STUDENT), torch.stack(peers), loss="ce")
    assert stacked.item() == pytest.approx(got_ce.item(), rel=1e-6)


def test_codistillation_mse_targets_mean_peer_logits():
    want = 0.0
    for s, a, b in zip(STUDENT, PEER_A, PEER_B):
        want += sum((si - (ai + bi) / 2) ** 2 for si, ai, bi in zip(s, a, b))
    want /= 6
    got = codistillation_loss(torch.tensor(STUDENT), [torch.tensor(PEER_A), torch.tensor(PEER_B)], loss="mse")
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_codistillation_single_peer_tensor_and_no_gradient_into_peers():
    z = torch.tensor(STUDENT, requires_grad=True)
    peer = torch.tensor(PEER_A, requires_grad=True)
    for kind in ("ce", "kl", "mse"):
        z.grad = None
        codistillation_loss(z, peer, loss=kind).backward()
        assert z.grad is not None and z.grad.abs().sum() > 0
        assert peer.grad is None
    with pytest.raises(ConfigError):
        codistillation_loss(z, [], loss="ce")
