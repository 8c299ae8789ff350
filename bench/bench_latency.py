"""Latency repeatability: six identical tiny students against one teacher, timed the old way and the new way.

Old: 3 warm-up calls, then the median of 20 single-sample calls on the process's threads (what the model card
showed before).
New: kd_core.models.model_stats (warm-up, time-bounded repetitions, median with p10/p90, per-call overhead).
The figure that matters is how far apart six identical students' speed-ups land. Writes
bench/results/latency.json and prints a table; it asserts nothing.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import print_table, write_result
from kd_core.models import build_model, model_stats

SHAPE, CLASSES, N_STUDENTS = (64,), 10, 6
STUDENT = {"arch": "mlp", "hidden": [11]}  # 64·11 + 11 + 11·10 + 10 = 845 parameters
TEACHER = {"arch": "mlp", "hidden": [256, 64]}  # about 23× the student


def old_latency(model: torch.nn.Module) -> float:
    model = model.eval()
    x = torch.zeros((1, *SHAPE))
    times = []
    with torch.no_grad():
        for _ in range(3):
            model(x)
        for _ in range(20):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    teacher = build_model(TEACHER, SHAPE, CLASSES)
    students = [build_model(STUDENT, SHAPE, CLASSES) for _ in range(N_STUDENTS)]
    rows, runs = [], []
    for k, student in enumerate(students):
        old = old_latency(teacher) / old_latency(student)
        started = time.perf_counter()
        s = model_stats(student, SHAPE)
        t = model_stats(teacher, SHAPE)
        took = time.perf_counter() - started
        new = t["cpu_latency_ms"] / s["cpu_latency_ms"]
        runs.append({"old_speedup": old, "new_speedup": new, "student": s, "teacher": t, "seconds": took})
        rows.append([
            k, old, new, s["cpu_latency_ms"], s["cpu_latency_p10_ms"], s["cpu_latency_p90_ms"],
            s["latency_repeats"], s["latency_overhead"], t["cpu_latency_ms"], took,
        ])  # fmt: skip
    print_table(
        ["student", "old speedup", "new speedup", "st med ms", "st p10", "st p90", "repeats", "overhead",
         "teacher med ms", "s (both)"],
        rows,
    )  # fmt: skip
    olds, news = [r["old_speedup"] for r in runs], [r["new_speedup"] for r in runs]
    summary = {
        "student_params": runs[0]["student"]["params"],
        "teacher_params": runs[0]["teacher"]["params"],
        "old_speedup_range": [min(olds), max(olds)],
        "new_speedup_range": [min(news), max(news)],
        "threads": torch.get_num_threads(),
    }
    print(
        f"\nsix identical {summary['student_params']}-parameter students vs a {summary['teacher_params']}-parameter "
        f"teacher: old speed-ups {min(olds):.2f}–{max(olds):.2f}×, new {min(news):.2f}–{max(news):.2f}×"
    )
    path = write_result("latency", {"summary": summary, "runs": runs})
    print(f"written {path}")


if __name__ == "__main__":
    main()
