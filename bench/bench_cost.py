"""Cost: distillation with and without the teacher-logit cache vs training alone; engine vs a hand-written loop."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import print_table, write_result
from kd_core.cache import TeacherLogitCache
from kd_core.config import ExperimentConfig
from kd_core.models import build_model
from kd_core.runner import load_experiment_dataset
from kd_core.sinks import NullSink
from kd_core.trainer import split_tensors, train_model

REPEATS = 5
EPOCHS = 15
TEACHER = {"arch": "cnn", "channels": [32, 64]}
STUDENTS = {"mlp[64]": {"arch": "mlp", "hidden": [64]}, "cnn[8,16]": {"arch": "cnn", "channels": [8, 16]}}


class _Teacher:
    """The minimum the cache needs: logits, a fingerprint; the module counts its forward passes."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module.eval()
        self.fingerprint = "bench-teacher"
        self.calls = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            return self.module(x)


def _model(dataset: Any, spec: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec, dataset.input_shape, dataset.num_classes, dataset.preprocessing)


def _hand_loop(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int
) -> tuple[float, int]:
    """The plain loop people write: Adam, shuffled index batches of on-device tensors, cross entropy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    steps = 0
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0] - 1, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    return time.perf_counter() - start, steps


def _timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    started = time.monotonic()
    # One thread: on a small shared box, a second OpenMP thread turns other processes' load into
    # multi-second stalls that swamp what is measured here.
    torch.set_num_threads(1)
    dataset = load_experiment_dataset(ExperimentConfig(dataset="digits"))
    x_train, y_train = split_tensors(dataset, "train", torch.device("cpu"))
    teacher_model = _model(dataset, TEACHER)
    train_model(teacher_model, dataset, ExperimentConfig(epochs=3, lr=0.003), sink=NullSink(), device="cpu")
    teacher = _Teacher(teacher_model)
    cfg = {"epochs": EPOCHS, "batch_size": 64, "lr": 0.001, "schedule": "none", "log_every": 10}
    train_cfg = ExperimentConfig(kind="train", **cfg)
    kd_cfg = ExperimentConfig(kind="distill", teacher="t", **cfg)

    results: dict[str, Any] = {"epochs": EPOCHS, "train_samples": int(x_train.shape[0]), "students": {}}
    rows = []
    step_rows = []
    for name, spec in STUDENTS.items():
        times: dict[str, list[float]] = {
            "alone": [],
            "kd_cached": [],
            "kd_cold": [],
            "kd_no_cache": [],
            "hand": [],
        }
        steps = 0
        # Interleaved repeats: noise from other processes on the box hits every variant alike.
        for _ in range(REPEATS):
            t, out = _timed(
                lambda spec=spec: train_model(
                    _model(dataset, spec), dataset, train_cfg, sink=NullSink(), device="cpu"
                )
            )
            times["alone"].append(t)
            steps = out.steps

            cache = TeacherLogitCache(None)
            fill, logits = _timed(
                lambda cache=cache: {
                    s: cache.logits(teacher, dataset, s, split_tensors(dataset, s, torch.device("cpu"))[0])
                    for s in ("train", "val")
                }
            )
            t, _ = _timed(
                lambda logits=logits, spec=spec: train_model(
                    _model(dataset, spec),
                    dataset,
                    kd_cfg,
                    teacher_logits_fn=teacher.logits,
                    teacher_logits=logits,
                    sink=NullSink(),
                    device="cpu",
                )
            )
            times["kd_cached"].append(t)
            times["kd_cold"].append(t + fill)

            t, _ = _timed(
                lambda spec=spec: train_model(
                    _model(dataset, spec),
                    dataset,
                    kd_cfg,
                    teacher_logits_fn=teacher.logits,
                    teacher_per_batch=True,
                    sink=NullSink(),
                    device="cpu",
                )
            )
            times["kd_no_cache"].append(t)

            t, hand_steps = _hand_loop(_model(dataset, spec), x_train, y_train, EPOCHS, 64)
            times["hand"].append(t)
        # The fastest repeat is the cost itself; slower ones measure whatever else ran on the box.
        med = {k: min(v) for k, v in times.items()}
        results["students"][name] = {
            "spec": spec,
            "steps": steps,
            "hand_steps": hand_steps,
            "times_s": times,
            "min_s": med,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
        }
        alone = med["alone"]
        rows.append(
            [
                name,
                f"{alone:.2f}",
                f"{med['kd_cached'] / alone:.2f}",
                f"{med['kd_cold'] / alone:.2f}",
                f"{med['kd_no_cache'] / alone:.2f}",
            ]
        )
        engine_ms = 1000 * alone / steps
        hand_ms = 1000 * med["hand"] / hand_steps
        step_rows.append([name, f"{engine_ms:.3f}", f"{hand_ms:.3f}", f"{engine_ms / hand_ms:.2f}"])
        results["students"][name]["engine_step_ms"] = engine_ms
        results["students"][name]["hand_step_ms"] = hand_ms

    print(f"digits, {EPOCHS} epochs, teacher {TEACHER}, best of {REPEATS}, {torch.get_num_threads()} threads")
    print("wall time relative to training the student alone (1.00):")
    print_table(["student", "alone s", "KD cached", "KD cold cache", "KD no cache"], rows)
    print("\nper optimisation step (engine includes per-epoch validation, logging, NaN checks):")
    print_table(["student", "engine ms/step", "hand loop ms/step", "engine / hand"], step_rows)
    path = write_result("bench_cost", {**results, "wall_s": time.monotonic() - started})
    print(f"wrote {path} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
