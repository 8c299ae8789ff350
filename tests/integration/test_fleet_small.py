"""The fleet path, scaled down, on a real stack: worker processes with the real sink, many sockets, nothing lost.

Uses bench/bench_fleet.py's harness (bench/fleet_stack.py's stack: uvicorn with 2 web processes, private
Redis, the database of DATABASE_URL or SQLite). Behaviour only, never timings: every logged point is in the database exactly once
and reaches every watcher (live, or from /metrics/?since= after a merge).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_fleet import ROOT, Config, run_config
from bench.fleet_stack import start_stack


@pytest.fixture(scope="module")
def fleet_stack(tmp_path_factory: pytest.TempPathFactory):
    stack = start_stack(tmp_path_factory.mktemp("fleet"), web=2)
    yield stack
    stack.stop()


def test_workers_and_sockets_lose_and_duplicate_nothing(fleet_stack, tmp_path: Path) -> None:
    cfg = Config("small", web=2, workers=3, sockets=20, rate=20.0, series=5, seconds=4.0)
    result = run_config(fleet_stack, cfg, tmp_path)
    assert result["connected"] == 20
    assert result["points_logged"] >= 3 * 5 * 40  # about 4 s at 20 steps/s each
    assert result["db_rows"] == result["points_logged"]
    assert result["db_duplicate_rows"] == 0
    assert result["lost"] == 0
    assert result["unexpected"] == 0
    assert result["duplicate_deliveries"] == 0
    assert result["live_points_received"] > 0


def test_fleet_bench_runs_end_to_end_in_its_own_process(tmp_path: Path) -> None:
    """`python -m bench.bench_fleet` starts and stops everything by itself and writes its JSON."""
    res = subprocess.run(
        [sys.executable, "-m", "bench.bench_fleet", "--only", "1 job, 1 socket", "--seconds", "2", "--web", "1"],
        cwd=ROOT, env={**os.environ, "KD_BENCH_FLEET_TAG": "test"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((ROOT / "bench" / "results" / "bench_fleet-test.json").read_text())
    (ROOT / "bench" / "results" / "bench_fleet-test.json").unlink()
    [row] = result["configs"]
    assert row["lost"] == 0 and row["db_missing_rows"] == 0 and row["connected"] == 1
