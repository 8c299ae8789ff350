"""A search on a real stack with two worker processes: a tiny distill-to-a-budget on digits, to completion."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.client import Api
from tests.integration.jobs import wait_for, write_digits_npz
from tests.stack import ROOT, start_stack


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory):
    if not (ROOT / "manage.py").exists():
        pytest.skip("the web app is not there yet")
    stack = start_stack(tmp_path_factory.mktemp("search-stack"), workers=2)
    yield stack
    stack.stop()


def wait_search(api: Api, search_id: int, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        search = api.get(f"/api/searches/{search_id}/")
        if search["status"] in ("succeeded", "failed", "cancelled"):
            return search
        if time.monotonic() > deadline:
            raise AssertionError(f"search {search_id} still {search['status']} after {timeout}s: {search}")
        time.sleep(0.5)


def test_tiny_search_runs_to_completion_on_two_workers(two_workers, tmp_path: Path) -> None:
    api = Api(two_workers.url, two_workers.make_user("search-owner", "search-owner-pw-1234"))
    npz = write_digits_npz(tmp_path / "digits.npz")
    dataset_id = api.upload("/api/datasets/", {"name": "digits-search"}, npz)["id"]
    teacher_job = api.post(
        "/api/experiments/",
        {
            "kind": "train",
            "name": "cnn-teacher",
            "dataset": dataset_id,
            "model": {"arch": "cnn", "channels": [16, 32]},
            "epochs": 4,
        },
    )
    assert wait_for(api, teacher_job["id"], timeout=240)["status"] == "succeeded"
    teacher = next(c["id"] for c in api.get("/api/checkpoints/")["checkpoints"]
                   if c.get("source_experiment") == teacher_job["id"])  # fmt: skip

    # One listed student is over the parameter budget: recorded, never trained.
    students = [
        {"arch": "cnn", "channels": [8]},
        {"arch": "mlp", "hidden": [32]},
        {"arch": "mlp", "hidden": [512]},
    ]
    created = api.post("/api/searches/", {
        "name": "tiny", "dataset": dataset_id, "teacher": teacher, "budget": {"max_params": 5000},
        "space": {"students": students, "temperature": [2, 6], "alpha": [0.5, 0.9]},
        "trials": 4, "parallel": 2, "epochs": 3, "seed": 1,
    })  # fmt: skip
    assert created["status"] == "queued"
    search = wait_search(api, created["id"])
    assert search["status"] == "succeeded", search
    trained = [t for t in search["trials"] if t["state"] != "over_budget"]
    assert len(trained) == 4
    assert all(t["state"] in ("complete", "pruned") for t in trained), search["trials"]
    for t in search["trials"]:
        if t["state"] == "over_budget":
            assert t["experiment"] is None and t["figures"]["params"] > 5000 and "parameters" in t["reason"]
    complete = [t for t in trained if t["state"] == "complete"]
    assert complete and search["pareto"] and search["best"] == search["pareto"][0]
    best = max(complete, key=lambda t: t["metrics"]["val_acc"])
    assert search["best"] == best["experiment"]
    # The trials are ordinary experiments: curves and, for the front, downloads.
    exp = api.get(f"/api/experiments/{search['best']}/")
    assert exp["kind"] == "distill" and exp["status"] == "succeeded"
    assert {a["kind"] for a in exp["artifacts"]} >= {"safetensors"}
    assert api.get(f"/api/experiments/{search['best']}/metrics/")["series"]
    assert exp["metrics"]["student_params"] <= 5000
    # They ran on the `gpu` queue across both workers' processes (at most `parallel` at a time).
    workers = {api.get(f"/api/experiments/{t['experiment']}/")["worker"] for t in trained}
    assert workers and all(workers)
