"""Codistillation evaluation streams per-batch counts (O(batch) memory) and gives the figures of the whole-split logits."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_core.codistill import make_model
from kd_core.codistill.common import EvalSplit, SplitSums
from kd_core.config import parse_config
from kd_core.data import load_dataset
from kd_core.trainer import predict_logits

SYNTH = {"n_samples": 3000, "n_features": 8, "n_classes": 5}


def whole_split_metrics(logits, y):
    """The former evaluation, kept here as the reference: every replica's logits on the whole split at once."""
    out = {"loss": [], "acc": []}
    for z in logits:
        out["loss"].append(F.cross_entropy(z, y).item())
        out["acc"].append((z.argmax(1) == y).float().mean().item())
    probs = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(0)
    out["ens_loss"] = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()
    out["ens_acc"] = (probs.argmax(1) == y).float().mean().item()
    preds = [z.argmax(1) for z in logits]
    pairs = list(combinations(range(len(preds)), 2))
    out["churn"] = (
        float(np.mean([(preds[i] != preds[j]).float().mean().item() for i, j in pairs])) if pairs else 0.0
    )
    return out


@pytest.mark.parametrize("replicas", [1, 3])
def test_streamed_figures_equal_the_whole_split_ones(replicas):
    data = load_dataset("synthetic", options=SYNTH, seed=0)
    cfg = parse_config({"kind": "codistill", "dataset": "synthetic", "data_options": SYNTH,
                        "codistill": {"replicas": replicas}})  # fmt: skip
    models = [make_model(cfg, data, k, "cpu") for k in range(replicas)]
    split = EvalSplit(data, "train", "cpu")  # 2,100 rows: three batches of at most 1,024
    try:
        assert split.batches.steps_per_epoch == 3
        streamed = split.metrics(models)
        x = torch.as_tensor(np.asarray(data.x_train))
        y = torch.as_tensor(np.asarray(data.y_train), dtype=torch.long)
    finally:
        split.close()
    reference = whole_split_metrics([predict_logits(m, x) for m in models], y)
    assert streamed["acc"] == pytest.approx(reference["acc"], abs=1e-7)
    assert streamed["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert streamed["ens_acc"] == pytest.approx(reference["ens_acc"], abs=1e-7)
    assert streamed["ens_loss"] == pytest.approx(reference["ens_loss"], rel=1e-6)
    assert streamed["churn"] == pytest.approx(reference["churn"], abs=1e-7)
    if replicas > 1:
        assert 0 < streamed["churn"] < 1  # random replicas disagree somewhere: the figure is exercised


def test_counts_are_kept_not_logits():
    sums = SplitSums(2)
    z = [torch.randn(7, 4), torch.randn(7, 4)]
    sums.add(z, torch.arange(7) % 4)
    assert sums.n == 7 and not any(isinstance(v, torch.Tensor) and v.numel() > 2 for v in vars(sums).values())
    empty = SplitSums(2).metrics()
    assert all(v != v for v in empty["acc"]) and empty["churn"] != empty["churn"]
