"""Distillation methods side by side (Hinton, DKD, DIST, with/without logit standardisation) on digits, and
keep "last" vs "best" for codistillation churn under label noise.

Part 1: one CNN teacher, a small MLP student, seeds 0 and 1; test accuracy, agreement with the teacher and
KL(teacher || student) at T = 1 per method, each with its paper's default options (same T, lr, epochs).
Part 2 (issue 11, item 4): digits with 30% of the train and validation labels replaced at random; two
independently trained models vs two codistilled replicas, keeping the best-on-validation or the last
weights; churn = the fraction of test samples on which the pair disagrees.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import mean_std, print_table, write_result
from kd_core.checkpoints import load_teacher
from kd_core.config import CodistillConfig, ExperimentConfig
from kd_core.runner import load_experiment_dataset, run_experiment
from kd_core.sinks import NullSink
from kd_core.trainer import predict_logits, split_tensors

SEEDS = (0, 1)
TEACHER = {"arch": "cnn", "channels": [32, 64]}
STUDENT = {"arch": "mlp", "hidden": [16]}
# (label, fraction of the training split, epochs)
CASES = [("digits, mlp[16]", 1.0, 100), ("digits 15% data, mlp[16]", 0.15, 200)]
ARMS: list[tuple[str, dict[str, Any]]] = [
    ("alone", {"kind": "train"}),
    ("hinton", {"method": "hinton"}),
    ("hinton+LS", {"method": "hinton", "logit_standardization": True}),
    ("dkd", {"method": "dkd"}),
    ("dkd+LS", {"method": "dkd", "logit_standardization": True}),
    ("dist", {"method": "dist"}),
]
NOISE = 0.3


def _config(seed: int, epochs: int, **fields: Any) -> ExperimentConfig:
    base = {"kind": "distill", "teacher": "bench", "model": STUDENT, "epochs": epochs, "lr": 0.003,
            "seed": seed, "log_every": 50}  # fmt: skip
    base.update(fields)
    if base["kind"] == "train":
        base["teacher"] = None
    return ExperimentConfig(**base)


def _subset(full: Any, fraction: float) -> Any:
    n = int(len(full.x_train) * fraction)
    return dataclasses.replace(
        full, x_train=full.x_train[:n], y_train=full.y_train[:n], fingerprint=f"{full.fingerprint}:{n}"
    )


def methods(work: Path) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    full = load_experiment_dataset(ExperimentConfig(dataset="digits"))
    result = run_experiment(
        ExperimentConfig(kind="train", model=TEACHER, epochs=100, lr=0.003, log_every=50),
        dataset=full, out_dir=work / "teacher", sink=NullSink(), device="cpu",
    )  # fmt: skip
    teacher_acc = result.metrics["test_acc"]
    teacher = load_teacher(result.files["safetensors"])
    cases, rows = [], []
    for label, fraction, epochs in CASES:
        ds = _subset(full, fraction)
        for arm, fields in ARMS:
            runs = []
            for seed in SEEDS:
                t0 = time.monotonic()
                r = run_experiment(
                    _config(seed, epochs, **fields), dataset=ds, teacher=teacher if arm != "alone" else None,
                    out_dir=work / "runs", sink=NullSink(), device="cpu", cache_dir=work / "cache", export=False,
                )  # fmt: skip
                runs.append({**{k: r.metrics.get(k) for k in (
                    "test_acc", "val_acc", "test_agreement", "test_kl_to_teacher", "val_agreement",
                    "val_kl_to_teacher")}, "seed": seed, "wall_s": time.monotonic() - t0})  # fmt: skip
            acc = mean_std([x["test_acc"] for x in runs])
            agree = mean_std([x["test_agreement"] for x in runs]) if arm != "alone" else None
            kl = mean_std([x["test_kl_to_teacher"] for x in runs]) if arm != "alone" else None
            cases.append({"case": label, "train_samples": len(ds.x_train), "epochs": epochs, "arm": arm,
                          "fields": fields, "teacher_test_acc": teacher_acc, "runs": runs})  # fmt: skip
            rows.append([
                label, arm, f"{acc[0]:.4f} ± {acc[1]:.4f}",
                f"{agree[0]:.4f} ± {agree[1]:.4f}" if agree else "-",
                f"{kl[0]:.3f} ± {kl[1]:.3f}" if kl else "-",
            ])  # fmt: skip
    teacher.close()
    return cases, rows


def _noisy(full: Any, seed: int = 123) -> Any:
    """Replace NOISE of the train and validation labels by a random other class (a user's validation is noisy too)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val"):
        y = np.array(getattr(full, f"y_{split}"), copy=True)
        flip = rng.random(len(y)) < NOISE
        y[flip] = (y[flip] + rng.integers(1, full.num_classes, flip.sum())) % full.num_classes
        out[f"y_{split}"] = y
    return dataclasses.replace(full, **out, fingerprint=f"{full.fingerprint}:noise{NOISE}")


def churn(work: Path) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    ds = _noisy(load_experiment_dataset(ExperimentConfig(dataset="digits")))
    x_test, _ = split_tensors(ds, "test", torch.device("cpu"))
    spec, epochs = {"arch": "mlp", "hidden": [64]}, 60
    cases, rows = [], []
    for keep in ("best", "last"):
        for seed in SEEDS:
            preds = []
            for k in range(2):  # two independent models: seeds differ
                r = run_experiment(
                    ExperimentConfig(kind="train", model=spec, epochs=epochs, lr=0.003, seed=100 * seed + k,
                                     keep=keep, log_every=50),
                    dataset=ds, out_dir=work / "ind", sink=NullSink(), device="cpu", export=False,
                )  # fmt: skip
                preds.append(predict_logits(r.model, x_test).argmax(1))
            independent = float((preds[0] != preds[1]).float().mean())
            cd = run_experiment(
                ExperimentConfig(kind="codistill", model=spec, epochs=epochs, lr=0.003, seed=100 * seed, keep=keep,
                                 log_every=50, codistill=CodistillConfig(replicas=2, burn_in_steps=200)),
                dataset=ds, out_dir=work / "cd", sink=NullSink(), device="cpu", export=False,
            )  # fmt: skip
            cases.append({"keep": keep, "seed": seed, "independent_churn": independent,
                          "codistill_churn": cd.metrics["test_churn"],
                          "codistill_test_acc": cd.metrics["test_acc"]})  # fmt: skip
        ind = mean_std([c["independent_churn"] for c in cases if c["keep"] == keep])
        co = mean_std([c["codistill_churn"] for c in cases if c["keep"] == keep])
        rows.append([keep, f"{ind[0]:.4f} ± {ind[1]:.4f}", f"{co[0]:.4f} ± {co[1]:.4f}",
                     f"{(co[0] - ind[0]) / max(ind[0], 1e-9) * 100:+.0f}%"])  # fmt: skip
    return cases, rows


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)  # tiny models: one thread is as fast and leaves the other cores free
    parts = set(argv if argv else ["methods", "churn"])
    started = time.monotonic()
    payload: dict[str, Any] = {"seeds": list(SEEDS)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "methods" in parts:
            payload["methods"], rows = methods(work)
            print(f"test figures, mean ± std over seeds {list(SEEDS)}; teacher {TEACHER}, T=4, paper options")
            print_table(["case", "method", "test acc", "agreement", "KL(t || s), T=1"], rows)
        if "churn" in parts:
            payload["churn"], rows = churn(work)
            print(f"test churn of a pair of models, digits with {NOISE:.0%} label noise, seeds {list(SEEDS)}")
            print_table(["keep", "independent", "codistilled", "change"], rows)
    payload["wall_s"] = time.monotonic() - started
    path = write_result("bench_methods", payload)
    print(f"wrote {path} in {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
