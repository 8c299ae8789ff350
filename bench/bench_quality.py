"""Quality: distillation methods x student sizes x seeds on digits (15% of the data) and a generated image set.

For each dataset a teacher is trained once (seed 0) on hard labels, exported and loaded back as a user's
teacher file. Each student (3 sizes) is trained alone and distilled with Hinton's loss, Hinton + logit
standardisation, DKD, DKD + LS and DIST (each with its paper's default options; same T, lr, epochs and
seeds for every arm, so seeds are paired). Reported per case: test accuracy, top-1 agreement with the
teacher and KL(teacher || student) at T = 1 on the test split (the student alone included, as the
baseline fidelity), mean ± std over seeds; then which method wins each case, and whether its lead over
Hinton's loss and over the student alone is larger than the seed-to-seed noise (paired t interval, 95%).

Datasets: scikit-learn's digits with 15% of its training split (188 images), MLP students; and
bench/synthetic_images.py's CIFAR-shaped set (32x32x3, 10 classes that overlap with their neighbours),
small CNN students. The default is small (2 seeds, half the epochs, 2,000 images: sized for a few
minutes of one idle core); `--full` is the issue's grid (5 seeds, full epochs, 3,000 images). Run: `python -m bench
bench_quality` (or `make bench`), or `python -m bench.bench_quality --full` (see --help for the knobs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, mean_std, print_table, write_result
from bench.synthetic_images import image_dataset
from kd_core.checkpoints import load_teacher
from kd_core.config import ExperimentConfig
from kd_core.runner import load_experiment_dataset, run_experiment
from kd_core.sinks import NullSink
from kd_core.trainer import evaluate, predict_logits, split_tensors

DEFAULTS = ExperimentConfig()  # T and alpha as shipped
# The arms: the student alone, then each method with its paper's default options.
ARMS: list[tuple[str, dict[str, Any]]] = [
    ("alone", {"kind": "train"}),
    ("hinton", {"method": "hinton"}),
    ("hinton+LS", {"method": "hinton", "logit_standardization": True}),
    ("dkd", {"method": "dkd"}),
    ("dkd+LS", {"method": "dkd", "logit_standardization": True}),
    ("dist", {"method": "dist"}),
]
LR = 0.003
# Per dataset: teacher spec and epochs, the students (label, spec), the fraction of the training split the
# students see and their epochs, in the full grid (--full); the default run scales epochs by SMALL_EPOCHS.
SETS: dict[str, dict[str, Any]] = {
    "digits": {
        "teacher": {"arch": "cnn", "channels": [32, 64]},
        "teacher_epochs": 100,
        "students": [(f"mlp[{h}]", {"arch": "mlp", "hidden": [h]}) for h in (8, 16, 32)],
        "fraction": 0.15,
        "epochs": 200,
    },
    "images": {
        "teacher": {"arch": "cnn", "channels": [32, 64]},
        "teacher_epochs": 30,
        "students": [(f"cnn[{w},{2 * w}]", {"arch": "cnn", "channels": [w, 2 * w]}) for w in (4, 8, 16)],
        "fraction": 1.0,
        "epochs": 30,
    },
}
FULL_SEEDS = 5
SMALL_SEEDS = 2
SMALL_EPOCHS = 0.5
# Generated images (70% train, 10% val, 20% test): the full grid's and the default run's.
FULL_IMAGES = 3000
SMALL_IMAGES = 2000
# Two-sided 95% t quantiles by degrees of freedom, for the paired intervals of the verdicts.
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def _config(spec: dict, seed: int, epochs: int, **fields: Any) -> ExperimentConfig:
    base: dict[str, Any] = {"kind": "distill", "teacher": "bench", "model": spec, "epochs": epochs, "lr": LR,
                            "seed": seed, "log_every": 50, "temperature": DEFAULTS.temperature,
                            "alpha": DEFAULTS.alpha}  # fmt: skip
    base.update(fields)
    if base["kind"] == "train":
        base["teacher"] = None
    return ExperimentConfig(**base)


def _subset(full: Any, fraction: float) -> Any:
    """The first `fraction` of the training split; its own fingerprint keeps the logit cache apart."""
    n = int(len(full.x_train) * fraction)
    if n == len(full.x_train):
        return full
    return dataclasses.replace(
        full, x_train=full.x_train[:n], y_train=full.y_train[:n], fingerprint=f"{full.fingerprint}:{n}"
    )


def _load(name: str, images: int) -> Any:
    if name == "digits":
        return load_experiment_dataset(ExperimentConfig(dataset="digits"))
    return image_dataset(images, seed=0)


def _paired_lead(best: list[float], hinton: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width of the per-seed difference best - hinton (seeds are paired)."""
    diffs = [b - h for b, h in zip(best, hinton)]
    if len(diffs) < 2:
        return statistics.fmean(diffs), math.inf
    return statistics.fmean(diffs), T95.get(len(diffs) - 1, 2.0) * statistics.stdev(diffs) / math.sqrt(
        len(diffs)
    )


def _versus(accs: dict[str, list[float]], arm: str, other: str) -> str:
    lead, half = _paired_lead(accs[arm], accs[other])
    if lead - half > 0:
        word = "ahead"
    elif lead + half < 0:
        word = "behind"
    else:
        word = "a tie within seed noise"
    return f"{arm} vs {other} {lead * 100:+.2f} ± {half * 100:.2f} pts ({word})"


def _verdict(case: dict[str, Any]) -> str:
    """The best method by mean test accuracy, and its paired 95% interval against Hinton's loss and no teacher."""
    accs = {arm: [r["test_acc"] for r in runs] for arm, runs in case["arms"].items()}
    kd = max((a for a in accs if a != "alone"), key=lambda a: statistics.fmean(accs[a]))
    parts = [f"best method {kd}"]
    parts.append("Hinton's loss itself" if kd == "hinton" else _versus(accs, kd, "hinton"))
    parts.append(_versus(accs, kd, "alone"))
    return "; ".join(parts)


def _teacher(name: str, dataset: Any, epochs: int, work: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Train the dataset's teacher once (seed 0), export it and load it back as a user's teacher file."""
    result = run_experiment(
        _config(SETS[name]["teacher"], 0, epochs, kind="train"),
        dataset=dataset, out_dir=work / f"teacher-{name}", sink=NullSink(), device="cpu",
    )  # fmt: skip
    return load_teacher(result.files["safetensors"]), result.model, result.metrics


def run_set(
    name: str, seeds: list[int], scale: float, images: int, sizes: list[int], work: Path
) -> list[dict[str, Any]]:
    spec = SETS[name]
    full = _load(name, images)
    teacher, teacher_model, t_metrics = _teacher(
        name, full, max(1, round(spec["teacher_epochs"] * scale)), work
    )
    ds = _subset(full, spec["fraction"])
    epochs = max(1, round(spec["epochs"] * scale))
    x_test, y_test = split_tensors(ds, "test", torch.device("cpu"))
    # The student alone has no teacher in its run: its fidelity is measured here, the same way (T = 1).
    t_test = predict_logits(teacher_model, x_test)
    cases = []
    for label, student in [spec["students"][k] for k in sizes]:
        case: dict[str, Any] = {"dataset": name, "student": label, "student_spec": student,
                                "train_samples": len(ds.x_train), "epochs": epochs,
                                "teacher_spec": spec["teacher"], "teacher_test_acc": t_metrics["test_acc"],
                                "teacher_params": t_metrics["student_params"], "arms": {}}  # fmt: skip
        for arm, fields in ARMS:
            runs = []
            for seed in seeds:
                t0 = time.monotonic()
                r = run_experiment(
                    _config(student, seed, epochs, **fields), dataset=ds, teacher=teacher if arm != "alone" else None,
                    out_dir=work / "runs", sink=NullSink(), device="cpu", cache_dir=work / "cache", export=False,
                )  # fmt: skip
                fid = evaluate(r.model, x_test, y_test, teacher_logits=t_test)
                runs.append({"seed": seed, "test_acc": r.metrics["test_acc"], "val_acc": r.metrics["val_acc"],
                             "test_agreement": fid["agreement"], "test_kl_to_teacher": fid["kl_to_teacher"],
                             "engine_test_agreement": r.metrics.get("test_agreement"),
                             "engine_test_kl_to_teacher": r.metrics.get("test_kl_to_teacher"),
                             "wall_s": time.monotonic() - t0})  # fmt: skip
            case["arms"][arm] = runs
            case["student_params"] = r.metrics["student_params"]
            print(f"  {name} {label} {arm}: test acc "
                  f"{_pm(mean_std([x['test_acc'] for x in runs]))}", flush=True)  # fmt: skip
        case["verdict"] = _verdict(case)
        cases.append(case)
    teacher.close()
    return cases


def _pm(ms: tuple[float, float], digits: int = 4) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _rows(cases: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for case in cases:
        hinton = [r["test_acc"] for r in case["arms"]["hinton"]]
        for arm, runs in case["arms"].items():
            accs = [r["test_acc"] for r in runs]
            vs = "-" if arm == "hinton" else _pm(mean_std([a - h for a, h in zip(accs, hinton)]), 3)
            rows.append([
                case["dataset"], case["student"], arm, _pm(mean_std(accs)), vs,
                _pm(mean_std([r["test_agreement"] for r in runs])),
                _pm(mean_std([r["test_kl_to_teacher"] for r in runs]), 3),
            ])  # fmt: skip
    return rows


def report(cases: list[dict[str, Any]], seeds: list[int]) -> None:
    """The table and the verdicts (what `make bench` prints)."""
    print(f"\ntest figures, mean ± std over seeds {seeds}; T={DEFAULTS.temperature}, alpha={DEFAULTS.alpha}, "
          "paper options per method; vs hinton: paired per-seed difference")  # fmt: skip
    for case in cases:
        print(f"  {case['dataset']}: teacher {case['teacher_spec']} test acc {case['teacher_test_acc']:.4f} "
              f"({case['teacher_params']:,} params); {case['student']} {case['student_params']:,} params, "
              f"{case['train_samples']} training samples, {case['epochs']} epochs")  # fmt: skip
    print_table(["dataset", "student", "method", "test acc", "vs hinton", "agreement", "KL(t || s), T=1"],
                _rows(cases))  # fmt: skip
    print(
        "\nwho wins where: the method with the best mean test acc; its lead over Hinton's loss and over the "
        "student alone, paired per seed, 95% t interval"
    )
    for case in cases:
        print(f"  {case['dataset']}, {case['student']}: {case['verdict']}")


def merge(names: list[str], out: str) -> None:
    """One table and one result file from runs split over processes (e.g. one per dataset or student size)."""
    parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    seeds = sorted({s for p in parts for s in p["seeds"]})
    cases = [{**c, "verdict": _verdict(c)} for p in parts for c in p["cases"]]
    report(cases, seeds)
    path = write_result(out, {"cases": cases, "seeds": seeds, "merged_from": {n: {k: v for k, v in p.items()
                        if k != "cases"} for n, p in zip(names, parts)}})  # fmt: skip
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_quality", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--full", action="store_true", help=f"the issue's grid: {FULL_SEEDS} seeds, full epochs"
    )
    parser.add_argument(
        "--seeds", type=int, help=f"seeds 0..N-1 (default {SMALL_SEEDS}, --full {FULL_SEEDS})"
    )
    parser.add_argument(
        "--epochs", type=float, help=f"scale every epoch count (default {SMALL_EPOCHS}, --full 1)"
    )
    parser.add_argument("--datasets", default="digits,images", help="comma-separated: digits, images")
    parser.add_argument(
        "--images", type=int, help=f"generated images (default {SMALL_IMAGES}, --full {FULL_IMAGES})"
    )
    parser.add_argument("--sizes", default="0,1,2", help="student sizes to run, 0 = smallest (default 0,1,2)")
    parser.add_argument(
        "--merge", help="comma-separated result NAMEs of split runs: print them as one table, write --name"
    )
    parser.add_argument("--name", default="bench_quality", help="result file bench/results/NAME.json")
    # make bench / `python -m bench` call main() bare: the small default, whatever sys.argv holds.
    args = parser.parse_args(argv if argv is not None else [])
    if args.merge:
        merge([n.strip() for n in args.merge.split(",") if n.strip()], args.name)
        return
    seeds = list(range(args.seeds or (FULL_SEEDS if args.full else SMALL_SEEDS)))
    scale = args.epochs or (1.0 if args.full else SMALL_EPOCHS)
    images = args.images or (FULL_IMAGES if args.full else SMALL_IMAGES)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SETS))
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(SETS)}")
    try:
        sizes = sorted({int(k) for k in args.sizes.split(",")})
    except ValueError:
        parser.error(f"--sizes takes indices 0, 1, 2 separated by commas, got {args.sizes!r}")
    if not sizes or sizes[0] < 0 or sizes[-1] > 2:
        parser.error(f"--sizes takes indices 0, 1, 2 separated by commas, got {args.sizes!r}")
    # Tiny models: one thread is as fast and leaves the other cores to whatever else runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    cases: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                cases += run_set(name, seeds, scale, images, sizes, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    report(cases, seeds)
    payload = {"cases": cases, "seeds": seeds, "epochs_scale": scale, "images": images,
               "full": bool(args.full), "wall_s": time.monotonic() - started}  # fmt: skip
    path = write_result(args.name, payload)
    print(f"wrote {path} in {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
