"""Quality: teacher vs student trained alone vs distilled student, over seeds, on digits and synthetic."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import mean_std, print_table, write_result
from kd_core.checkpoints import load_teacher
from kd_core.config import ExperimentConfig
from kd_core.runner import load_experiment_dataset, run_experiment
from kd_core.sinks import NullSink

SEEDS = (0, 1, 2, 3, 4)
DEFAULTS = ExperimentConfig()  # T and alpha as shipped
TEACHERS = {
    "digits": {"arch": "cnn", "channels": [32, 64]},
    "synthetic": {"arch": "mlp", "hidden": [256, 256], "dropout": 0.3},
}
# (label, dataset, student spec, fraction of the training split kept, epochs). Distillation needs
# longer training than hard labels to pay off: at 40 epochs it gained nothing on these sets.
CASES = [
    ("digits, mlp[64]", "digits", {"arch": "mlp", "hidden": [64]}, 1.0, 100),
    ("digits, mlp[16]", "digits", {"arch": "mlp", "hidden": [16]}, 1.0, 100),
    ("digits 15% data, mlp[16]", "digits", {"arch": "mlp", "hidden": [16]}, 0.15, 200),
    ("synthetic, mlp[64]", "synthetic", {"arch": "mlp", "hidden": [64]}, 1.0, 100),
    # A student too small to follow the teacher closely: behind at 100 epochs, ahead at 300.
    ("synthetic, mlp[16]", "synthetic", {"arch": "mlp", "hidden": [16]}, 1.0, 100),
    ("synthetic, mlp[16], 300 ep", "synthetic", {"arch": "mlp", "hidden": [16]}, 1.0, 300),
]


def _config(kind: str, spec: dict, seed: int, epochs: int) -> ExperimentConfig:
    return ExperimentConfig(
        kind=kind,
        teacher="bench" if kind == "distill" else None,
        model=spec,
        epochs=epochs,
        lr=0.003,
        seed=seed,
        log_every=50,
        temperature=DEFAULTS.temperature,
        alpha=DEFAULTS.alpha,
    )


def _teacher(name: str, dataset: Any, work: Path) -> tuple[Any, dict[str, Any]]:
    """Train the dataset's teacher once (seed 0), export it and load it back as a user's teacher file."""
    out = work / f"teacher-{name}"
    result = run_experiment(
        _config("train", TEACHERS[name], 0, 100), dataset=dataset, out_dir=out, sink=NullSink(), device="cpu"
    )
    return load_teacher(result.files["safetensors"]), result.metrics


def main() -> None:
    # Tiny models: one thread is as fast and leaves the other cores to whatever else runs.
    torch.set_num_threads(1)
    started = time.monotonic()
    rows: list[list[Any]] = []
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datasets = {n: load_experiment_dataset(ExperimentConfig(dataset=n)) for n in TEACHERS}
        teachers = {n: _teacher(n, datasets[n], work) for n in TEACHERS}
        for label, name, spec, fraction, epochs in CASES:
            full = datasets[name]
            n = int(len(full.x_train) * fraction)
            # A shorter training split is another dataset: its own fingerprint keeps the cache apart.
            ds = dataclasses.replace(
                full,
                x_train=full.x_train[:n],
                y_train=full.y_train[:n],
                fingerprint=f"{full.fingerprint}:{n}",
            )
            teacher, t_metrics = teachers[name]
            runs: dict[str, list[dict[str, Any]]] = {"alone": [], "distilled": []}
            for seed in SEEDS:
                for kind, key in (("train", "alone"), ("distill", "distilled")):
                    result = run_experiment(
                        _config(kind, spec, seed, epochs),
                        dataset=ds,
                        teacher=teacher if kind == "distill" else None,
                        out_dir=work / "runs",
                        sink=NullSink(),
                        device="cpu",
                        cache_dir=work / "cache",
                        export=False,
                    )
                    runs[key].append(result.metrics)
            alone_m, alone_s = mean_std([m["test_acc"] for m in runs["alone"]])
            kd_m, kd_s = mean_std([m["test_acc"] for m in runs["distilled"]])
            gains = [d["test_acc"] - a["test_acc"] for a, d in zip(runs["alone"], runs["distilled"])]
            gain_m, gain_s = mean_std(gains)
            student = runs["alone"][0]
            case = {
                "case": label,
                "dataset": name,
                "train_samples": n,
                "epochs": epochs,
                "student_spec": spec,
                "teacher_spec": TEACHERS[name],
                "teacher_test_acc": t_metrics["test_acc"],
                "teacher_params": t_metrics["student_params"],
                "student_params": student["student_params"],
                "alone_test_acc": [m["test_acc"] for m in runs["alone"]],
                "distilled_test_acc": [m["test_acc"] for m in runs["distilled"]],
                "alone_val_acc": [m["val_acc"] for m in runs["alone"]],
                "distilled_val_acc": [m["val_acc"] for m in runs["distilled"]],
                "gain_mean": gain_m,
                "gain_std": gain_s,
                "temperature": DEFAULTS.temperature,
                "alpha": DEFAULTS.alpha,
                "seeds": list(SEEDS),
            }
            cases.append(case)
            rows.append(
                [
                    label,
                    n,
                    f"{t_metrics['test_acc']:.4f}",
                    f"{alone_m:.4f} ± {alone_s:.4f}",
                    f"{kd_m:.4f} ± {kd_s:.4f}",
                    f"{gain_m * 100:+.2f} ± {gain_s * 100:.2f}",
                    f"{t_metrics['student_params']:,} / {student['student_params']:,}",
                ]
            )
    print(
        f"test accuracy, mean ± std over seeds {list(SEEDS)}; T={DEFAULTS.temperature}, alpha={DEFAULTS.alpha}"
    )
    print_table(
        [
            "case",
            "train n",
            "teacher",
            "student alone",
            "distilled",
            "gain (pts)",
            "params teacher / student",
        ],
        rows,
    )
    path = write_result(
        "bench_quality", {"cases": cases, "wall_s": time.monotonic() - started, "seeds": list(SEEDS)}
    )
    print(f"wrote {path} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
