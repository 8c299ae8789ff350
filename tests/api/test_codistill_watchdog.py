"""The codistillation watchdog's decisions on a real database and state folder: what it settles, what it leaves."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from webapp.studio.models import Experiment
from workers import codistill


@pytest.fixture
def spread(owner, settings, tmp_path) -> tuple[Experiment, Path]:
    """A running two-group codistillation with placement "workers", fanned out; group 1 ended with an error."""
    settings.STATE_DIR = str(tmp_path / "state")
    exp = Experiment.objects.create(
        owner=owner, name="watched", kind="codistill", status=Experiment.RUNNING,
        config={"kind": "codistill", "codistill": {"replicas": 2, "placement": "workers"}},
    )  # fmt: skip
    folder = tmp_path / "state" / "jobs" / str(exp.pk)
    (folder / "progress").mkdir(parents=True)
    (folder / "fanned_out").touch()
    marker = {"worker": "w1@host", "started": time.time() - 5, "finished": time.time(), "error": "boom"}
    (folder / "group1.json").write_text(json.dumps(marker))
    return exp, folder


def _beat(folder: Path, age_s: float) -> None:
    now = time.time()
    beat = {
        "worker": "w0@host",
        "started": now - age_s - 5,
        "progress": 0.5,
        "eta_s": 3.0,
        "beat": now - age_s,
    }
    (folder / "progress" / "group0.json").write_text(json.dumps(beat))


@pytest.mark.django_db(transaction=True)  # the watchdog closes stale connections, as a task does
def test_a_group_with_a_fresh_heartbeat_is_left_alone(spread) -> None:
    exp, folder = spread
    _beat(folder, age_s=1.0)  # slow, but its heartbeat thread still writes
    assert codistill.settle_abandoned() == []
    exp.refresh_from_db()
    assert exp.status == Experiment.RUNNING and not (folder / "group0.json").exists()


@pytest.mark.django_db(transaction=True)  # the watchdog closes stale connections, as a task does
def test_a_stale_last_group_is_recorded_lost_and_the_experiment_finished_once(spread) -> None:
    exp, folder = spread
    _beat(folder, age_s=codistill.stale_after_s() + 5)
    assert codistill.settle_abandoned() == [exp.pk]
    exp.refresh_from_db()
    # No group left a replica: failed, naming both groups' reasons.
    assert exp.status == Experiment.FAILED and exp.finished is not None
    assert "group 0: lost: its worker w0@host stopped reporting" in exp.error and "group 1: boom" in exp.error
    assert codistill.settle_abandoned() == []  # idempotent: no longer running
    (folder / "combine.lock").unlink()  # even with the lock gone, a finished experiment stays as it is
    assert codistill.settle_abandoned() == []


@pytest.mark.django_db(transaction=True)  # the watchdog closes stale connections, as a task does
def test_a_group_never_started_counts_lost_only_after_the_start_window(spread, monkeypatch) -> None:
    exp, folder = spread
    assert codistill.settle_abandoned() == []  # group 0 queued: within the (default 6 h) window
    monkeypatch.setenv("KD_CODISTILL_START_S", "30")
    assert codistill.settle_abandoned() == []  # group 1 just ended: still within 30 s
    old = time.time() - 60
    os.utime(folder / "fanned_out", (old, old))
    marker = json.loads((folder / "group1.json").read_text())
    (folder / "group1.json").write_text(json.dumps({**marker, "finished": old}))
    assert codistill.settle_abandoned() == [exp.pk]
    exp.refresh_from_db()
    assert exp.status == Experiment.FAILED and "group 0: lost: it never started in 60 s" in exp.error


@pytest.mark.django_db(transaction=True)  # the watchdog closes stale connections, as a task does
def test_an_experiment_being_combined_is_left_to_its_combiner(spread) -> None:
    exp, folder = spread
    _beat(folder, age_s=codistill.stale_after_s() + 5)
    (folder / "combine.lock").touch()
    assert codistill.settle_abandoned() == []
    exp.refresh_from_db()
    assert exp.status == Experiment.RUNNING
