"""The command line: `python -m kd_core run` in a real subprocess, and its error handling."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_core.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "kd_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )


def test_run_trains_then_distills_from_the_exported_file(tmp_path):
    teacher_cfg = tmp_path / "teacher.json"
    teacher_cfg.write_text(
        json.dumps(
            {
                "dataset": "digits",
                "kind": "train",
                "epochs": 2,
                "lr": 0.01,
                "log_every": 5,
                "model": {"arch": "mlp", "hidden": [32]},
            }
        )
    )
    done = _run_cli(
        "run", str(teacher_cfg), "--out", str(tmp_path / "teacher"), "--device", "cpu", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "teacher"
    for name in ("result.json", "metrics.csv", "student.safetensors", "student.ts", "student.onnx"):
        assert (out / name).is_file(), name
    rows = list(csv.reader((out / "metrics.csv").open()))
    assert rows[0] == ["name", "step", "value"]
    assert {"train/loss", "val/acc", "lr"} <= {r[0] for r in rows[1:]}
    assert "test acc" in done.stdout and "params" in done.stdout  # the results table

    # The teacher path is relative to the config file's folder; the run goes from another folder.
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "kd.json").write_text(
        json.dumps(
            {
                "dataset": "digits",
                "kind": "distill",
                "teacher": "../teacher/student.safetensors",
                "epochs": 1,
                "model": {"arch": "mlp", "hidden": [8]},
                "temperature": 2.0,
                "alpha": 0.5,
            }
        )
    )
    done = _run_cli(
        "run", "configs/kd.json", "--out", "kd", "--cache-dir", "cache", "--device", "cpu", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "kd" / "result.json").read_text())["metrics"]
    assert metrics["teacher_acc"] > 0.5 and metrics["compression"] > 1
    assert "teacher" in done.stdout
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


@pytest.mark.parametrize(
    "config,message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"dataset": "digits", "epochs": 0}), "'epochs' must be >= 1"),
        (json.dumps({"dataset": "no-such.npz"}), "dataset file not found"),
        (json.dumps({"dataset": "digits", "kind": "distill", "teacher": "missing.pt"}), "missing.pt"),
        (json.dumps({"dataset": 3}), "file path"),
    ],
)
def test_errors_are_one_readable_line_and_exit_code_2(tmp_path, capsys, config, message):
    path = tmp_path / "bad.json"
    path.write_text(config)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_demo_prints_teacher_student_and_distilled(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--out", str(tmp_path), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    for row in ("teacher", "student alone", "distilled"):
        assert row in table
    for sub in ("teacher", "student", "distilled"):
        assert (tmp_path / sub / "result.json").is_file() and (tmp_path / sub / "student.onnx").is_file()
    kd = json.loads((tmp_path / "distilled" / "result.json").read_text())["metrics"]
    assert kd["teacher_acc"] > 0.9 and kd["compression"] > 1
