"""DKD, DIST and logit standardisation against direct computations of their papers' equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_core.config import parse_config
from kd_core.errors import ConfigError
from kd_core.losses import dist_terms, dkd_terms, kd_loss, standardize

# Four samples, four classes; class 3 is nobody's label (a class absent from the batch).
STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [2.5, 0.1, -0.3, 0.0], [0.3, 0.4, 0.2, 1.5]]
TEACHER = [[2.0, 1.0, 0.0, -2.0], [0.5, 0.5, 4.0, 1.0], [3.0, -1.0, 0.0, 0.5], [1.0, 2.0, -1.0, 0.0]]
LABELS = [1, 2, 0, 1]


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    m = max(row)
    exps = [math.exp((v - m) / t) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _ce(row: list[float], y: int) -> float:
    return -math.log(_softmax(row)[y])


def _dkd_hand(s_rows, t_rows, labels, t: float) -> tuple[float, float]:
    """Zhao et al. 2022, eqs. 1-4: b = [p_t, 1 - p_t], p̂ = non-target probabilities renormalised."""
    tckd = nckd = 0.0
    for s, te, y in zip(s_rows, t_rows, labels):
        ps, pt = _softmax(s, t), _softmax(te, t)
        tckd += _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        hat_s = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
        hat_t = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
        nckd += _kl(hat_t, hat_s)
    n = len(labels)
    return t * t * tckd / n, t * t * nckd / n


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def _dist_hand(s_rows, t_rows, t: float) -> tuple[float, float]:
    """Huang et al. 2022, eqs. 5-9: 1 - Pearson per sample (inter) and per class across the batch (intra)."""
    ys = [_softmax(r, t) for r in s_rows]
    yt = [_softmax(r, t) for r in t_rows]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols = range(len(ys[0]))
    intra = 1 - sum(_pearson([r[c] for r in ys], [r[c] for r in yt]) for c in cols) / len(ys[0])
    return t * t * inter, t * t * intra


def _std(row: list[float]) -> list[float]:
    m = sum(row) / len(row)
    sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))  # unbiased, as the paper's code
    return [(v - m) / sd for v in row]


S, T, Y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)


@pytest.mark.parametrize("t", [1.0, 4.0, 0.5])
def test_dkd_terms_match_the_paper(t: float) -> None:
    tckd, nckd = dkd_terms(S, T, Y, t)
    hand = _dkd_hand(STUDENT, TEACHER, LABELS, t)
    assert float(tckd) == pytest.approx(hand[0], rel=1e-5)
    assert float(nckd) == pytest.approx(hand[1], rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dkd_total_with_warmup_and_options(t: float) -> None:
    tckd, nckd = _dkd_hand(STUDENT, TEACHER, LABELS, t)
    ce = sum(_ce(s, y) for s, y in zip(STUDENT, LABELS)) / 4
    opts = {"alpha": 0.5, "beta": 2.0, "warmup_epochs": 10.0}
    for epoch, ramp in ((0.0, 0.0), (5.0, 0.5), (25.0, 1.0)):
        total, hard, soft = kd_loss(
            S, T, Y, method="dkd", options=opts, temperature=t, alpha=0.9, epoch=epoch
        )
        assert float(hard) == pytest.approx(ce, rel=1e-5)
        assert float(soft) == pytest.approx(ramp * (0.5 * tckd + 2.0 * nckd), rel=1e-5, abs=1e-7)
        assert float(total) == pytest.approx(ce + ramp * (0.5 * tckd + 2.0 * nckd), rel=1e-5)


def test_dkd_paper_defaults() -> None:
    tckd, nckd = _dkd_hand(STUDENT, TEACHER, LABELS, 4.0)
    _, _, soft = kd_loss(S, T, Y, method="dkd", temperature=4.0, alpha=0.9, epoch=40.0)
    assert float(soft) == pytest.approx(1.0 * tckd + 8.0 * nckd, rel=1e-5)


def test_dkd_needs_labels() -> None:
    with pytest.raises(ConfigError, match="labels"):
        kd_loss(S, T, None, method="dkd", temperature=4.0, alpha=0.9)


def test_dkd_stays_finite_when_the_student_is_certain() -> None:
    # A student probability that underflows float32 would give log 0 = -inf in a naive implementation.
    s = torch.tensor([[200.0, -200.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 2.0]])
    tckd, nckd = dkd_terms(s, t, torch.tensor([0]), 1.0)
    assert math.isfinite(float(tckd)) and math.isfinite(float(nckd))
    s.requires_grad_(True)
    total, _, _ = kd_loss(s, t, torch.tensor([0]), method="dkd", temperature=1.0, alpha=0.0, epoch=100.0)
    total.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dist_terms_match_the_paper(t: float) -> None:
    inter, intra = dist_terms(S, T, t)
    hand = _dist_hand(STUDENT, TEACHER, t)
    assert float(inter) == pytest.approx(hand[0], rel=1e-5)
    assert float(intra) == pytest.approx(hand[1], rel=1e-5)


def test_dist_total_and_unlabeled() -> None:
    inter, intra = _dist_hand(STUDENT, TEACHER, 1.0)
    ce = sum(_ce(s, y) for s, y in zip(STUDENT, LABELS)) / 4
    opts = {"beta": 2.0, "gamma": 0.5}
    total, _, soft = kd_loss(S, T, Y, method="dist", options=opts, temperature=1.0, alpha=0.9)
    assert float(total) == pytest.approx(ce + 2.0 * inter + 0.5 * intra, rel=1e-5)
    # A transfer set (no labels): the relation terms alone.
    total, hard, _ = kd_loss(S, T, None, method="dist", options=opts, temperature=1.0, alpha=0.9)
    assert float(hard) == 0.0
    assert float(total) == pytest.approx(2.0 * inter + 0.5 * intra, rel=1e-5)


def test_dist_batch_of_one_has_no_intra_term() -> None:
    inter, intra = dist_terms(S[:1], T[:1], 1.0)
    assert float(intra) == 0.0
    assert float(inter) == pytest.approx(1 - _pearson(_softmax(STUDENT[0]), _softmax(TEACHER[0])), rel=1e-5)


def test_standardize_matches_z_scores() -> None:
    z = standardize(S)
    for row, hand in zip(z.tolist(), (_std(r) for r in STUDENT)):
        assert row == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_hinton_with_logit_standardization(t: float) -> None:
    alpha = 0.7
    soft = sum(_kl(_softmax(_std(te), t), _softmax(_std(s), t)) for s, te in zip(STUDENT, TEACHER)) / 4
    ce = sum(_ce(s, y) for s, y in zip(STUDENT, LABELS)) / 4  # the hard term sees the raw logits
    total, hard, got = kd_loss(S, T, Y, temperature=t, alpha=alpha, logit_standardization=True)
    assert float(got) == pytest.approx(soft, rel=1e-5)
    assert float(hard) == pytest.approx(ce, rel=1e-5)
    assert float(total) == pytest.approx(alpha * t * t * soft + (1 - alpha) * ce, rel=1e-5)
    # No labels: the soft term alone.
    total, _, _ = kd_loss(S, T, None, temperature=t, alpha=alpha, logit_standardization=True)
    assert float(total) == pytest.approx(t * t * soft, rel=1e-5)


def test_dkd_with_logit_standardization() -> None:
    tckd, nckd = _dkd_hand([_std(r) for r in STUDENT], [_std(r) for r in TEACHER], LABELS, 2.0)
    _, _, soft = kd_loss(
        S, T, Y, method="dkd", temperature=2.0, alpha=0.9, logit_standardization=True, epoch=99
    )
    assert float(soft) == pytest.approx(tckd + 8.0 * nckd, rel=1e-5)


def test_hinton_is_unchanged() -> None:
    ours = kd_loss(S, T, Y, temperature=3.0, alpha=0.6)
    p, log_q = F.softmax(T / 3, dim=1), F.log_softmax(S / 3, dim=1)
    soft = (p * (p.log() - log_q)).sum(1).mean()
    hard = F.cross_entropy(S, Y)
    assert float(ours[0]) == pytest.approx(float(0.6 * 9 * soft + 0.4 * hard), rel=1e-5)


@pytest.mark.parametrize("method", ["hinton", "dkd", "dist"])
def test_uncovered_samples_get_only_the_hard_loss(method: str) -> None:
    covered = torch.tensor([True, False, True, True])
    total, _, _ = kd_loss(S, T, Y, method=method, temperature=2.0, alpha=0.5, covered=covered, epoch=50)
    part, _, _ = kd_loss(
        S[covered], T[covered], Y[covered], method=method, temperature=2.0, alpha=0.5, epoch=50
    )
    ce_rest = _ce(STUDENT[1], LABELS[1])
    assert float(total) == pytest.approx((3 * float(part) + ce_rest) / 4, rel=1e-5)


def test_config_fields_and_errors() -> None:
    config = parse_config({"dataset": "digits", "method": "dkd", "method_options": {"beta": 4}})
    assert config.method == "dkd" and config.method_options == {"beta": 4.0} and config.keep == "best"
    assert parse_config({"dataset": "digits"}).method == "hinton"
    problems = [
        ({"method": "fitnets"}, "'method' must be one of hinton, dkd, dist"),
        ({"method": "dist", "method_options": {"alpha": 1}}, "unknown option(s) for method dist: alpha"),
        ({"method": "dkd", "method_options": {"beta": -1}}, "'method_options.beta' must be >= 0"),
        ({"method": "dist", "logit_standardization": True}, "applies to methods hinton and dkd"),
        ({"method": "dist", "batch_size": 1}, "at least 2 for method dist"),
        ({"keep": "middle"}, "'keep' must be one of best, last"),
        ({"logit_standardization": "yes"}, "must be true or false"),
    ]
    for fields, message in problems:
        with pytest.raises(ConfigError) as info:
            parse_config({"dataset": "digits", **fields})
        assert message in str(info.value), (fields, str(info.value))
