"""Codistillation spread over Celery tasks (one per group) through the shared state folder, on a real stack."""

from __future__ import annotations

import time

import pytest

from tests.integration.client import Api
from tests.integration.jobs import FINISHED, wait_for, write_digits_npz


@pytest.fixture(scope="module")
def dataset_id(api: Api, tmp_path_factory: pytest.TempPathFactory) -> int:
    path = write_digits_npz(tmp_path_factory.mktemp("codistill") / "digits.npz")
    return api.upload("/api/datasets/", {"name": "digits-codistill"}, path)["id"]


def test_groups_run_as_tasks_exchange_copies_and_combine(api: Api, dataset_id: int) -> None:
    config = {"kind": "codistill", "name": "it-codistill", "dataset": dataset_id,
              "model": {"arch": "mlp", "hidden": [32]}, "epochs": 20, "max_steps": 240, "log_every": 20,
              "codistill": {"replicas": 2, "burn_in_steps": 40, "exchange_every": 20, "placement": "workers"}}  # fmt: skip
    experiment_id = api.post("/api/experiments/", config)["id"]
    exp = wait_for(api, experiment_id, timeout=180)
    assert exp["status"] == "succeeded", exp
    metrics = exp["metrics"]
    assert metrics["val_acc"] > 0.5 and "ensemble_test_acc" in metrics and "group_errors" not in metrics
    series = api.get(f"/api/experiments/{experiment_id}/metrics/")["series"]
    assert "replica0/train/loss" in series and "replica1/train/loss" in series
    # Each group read the other's published copies: the exchange went through the shared folder.
    peer_versions = series["replica0/exchange/peer1_version"] + series["replica1/exchange/peer0_version"]
    assert max(v for _, v in peer_versions) >= 1
    kinds = {(a["kind"], a["replica"]) for a in exp["artifacts"]}
    assert {("onnx", None), ("onnx", 0), ("onnx", 1), ("safetensors", 1)} <= kinds

    import numpy as np
    import onnxruntime as ort

    model = api.download(f"/api/experiments/{experiment_id}/download/?format=onnx&replica=1")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"input": np.zeros((3, 1, 8, 8), np.float32)})[0]
    assert out.shape == (3, 10)


# ---------------------------------------------------------------- two real worker processes


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory):
    """A stack of its own with two Celery worker processes (concurrency 1 each): one group per worker.

    Its own, because the fault tests below SIGKILL workers. A group silent for 10 s counts as lost;
    the codistillation watchdog is scheduled every 2 s (for a worker started with beat).
    """
    from tests.stack import ROOT, start_stack

    if not (ROOT / "manage.py").exists():
        pytest.skip("the web app (manage.py) is not there yet")
    tmp = tmp_path_factory.mktemp("codistill-2w")
    stack = start_stack(
        tmp, workers=2, extra_env={"KD_CODISTILL_STALE_S": "10", "KD_CODISTILL_WATCHDOG_EVERY_S": "2"}
    )
    try:
        api = Api(stack.url, stack.make_user("it-codistill", "it-codistill-pw-1234"))
        path = write_digits_npz(tmp / "digits.npz")
        dataset = api.upload("/api/datasets/", {"name": "digits-2w"}, path)["id"]
        yield stack, api, dataset
    finally:
        stack.stop()


def _config(dataset: int, name: str, max_steps: int) -> dict:
    return {"kind": "codistill", "name": name, "dataset": dataset, "model": {"arch": "mlp", "hidden": [64]},
            "epochs": 1000, "max_steps": max_steps, "log_every": 25,
            "codistill": {"replicas": 2, "burn_in_steps": 50, "exchange_every": 25, "placement": "workers"}}  # fmt: skip


def _node(worker: str) -> str:
    return worker.split("@", 1)[0]


def test_two_workers_train_the_groups_concurrently_and_exchange_live(two_workers) -> None:
    stack, api, dataset = two_workers
    total = 5000
    experiment_id = api.post("/api/experiments/", _config(dataset, "it-codistill-2w", total))["id"]
    seen_progress = []
    while (exp := api.get(f"/api/experiments/{experiment_id}/"))["status"] not in FINISHED:
        seen_progress.append(exp["progress"] or 0.0)
        time.sleep(0.2)
    assert exp["status"] == "succeeded", exp
    m = exp["metrics"]
    assert "group_errors" not in m and 0 <= m["churn"] <= 1 and m["ensemble_val_acc"] > 0.5
    assert m["val_acc"] == max(m["replica0_val_acc"], m["replica1_val_acc"])
    groups = m["groups"]
    # One group per worker process, both at once.
    assert {_node(g["worker"]) for g in groups} == {
        _node(stack.nodes["worker"]),
        _node(stack.nodes["worker1"]),
    }
    assert max(g["started"] for g in groups) < min(g["finished"] for g in groups)
    assert all(g["steps"] == total and g["error"] is None for g in groups)
    series = api.get(f"/api/experiments/{experiment_id}/metrics/")["series"]
    # Each picked up copies the other published while it was still training (not only its final one):
    # a group publishes at burn-in, every 25 steps, and once at the end.
    final_version = len(range(50, total, 25)) + 1
    for g in (0, 1):
        held = [v for _, v in series[f"replica{g}/exchange/peer{1 - g}_version"]]
        assert any(1 <= v < final_version for v in held), (held, groups)
    # Live ensemble/churn curves during training (from group 0's held copy), the exact point at the end.
    ens_steps = [s for s, _ in series["ensemble/val/acc"]]
    assert min(ens_steps) < total and max(ens_steps) == total and "churn" in series
    assert any(0 < p < 1 for p in seen_progress) and exp["progress"] == 1.0


def test_a_group_whose_worker_is_killed_does_not_stall_the_other(two_workers) -> None:
    stack, api, dataset = two_workers
    experiment_id = api.post("/api/experiments/", _config(dataset, "it-codistill-kill", 6000))["id"]
    deadline = time.monotonic() + 60
    while True:  # both groups training: each has logged a loss
        series = api.get(f"/api/experiments/{experiment_id}/metrics/")["series"]
        if "replica0/train/loss" in series and "replica1/train/loss" in series:
            break
        assert time.monotonic() < deadline, api.get(f"/api/experiments/{experiment_id}/")
        time.sleep(0.1)
    killed = _node(stack.nodes["worker1"])
    stack.kill("worker1")  # SIGKILL to the worker and its pool child: no goodbye, no marker
    exp = wait_for(api, experiment_id, timeout=180)
    # Semantics: a replica survived, so the experiment succeeds with that replica, naming the lost group.
    assert exp["status"] == "succeeded", exp
    groups = {g["group"]: g for g in exp["metrics"]["groups"]}
    lost = [g for g, info in groups.items() if info["error"]]
    assert len(lost) == 1, groups
    (dead,) = lost
    assert _node(groups[dead]["worker"]) == killed and groups[1 - dead]["error"] is None
    (error,) = exp["metrics"]["group_errors"]
    assert error.startswith(f"group {dead}: lost") and killed in error
    assert exp["metrics"]["best_replica"] == 1 - dead and f"replica{dead}_val_acc" not in exp["metrics"]
    replicas = {a["replica"] for a in exp["artifacts"]}
    assert replicas == {None, 1 - dead}


def test_a_last_group_lost_after_the_others_returned_is_settled_by_the_watchdog(two_workers) -> None:
    """Two groups, one worker: group 0 returns before group 1 starts, then group 1's worker is killed.

    No group is left to notice; the beat watchdog on a freshly started worker finishes the experiment.
    """
    import secrets

    from tests.stack import WORKER_CMD
    from webapp.localstack import BEAT_ARGS

    stack, api, dataset = two_workers
    stack.kill("worker1")  # one worker left (the kill test above may have done it): groups run in turn
    total = 3000
    experiment_id = api.post("/api/experiments/", _config(dataset, "it-codistill-watchdog", total))["id"]
    deadline = time.monotonic() + 90
    while "replica1/train/loss" not in api.get(f"/api/experiments/{experiment_id}/metrics/")["series"]:
        assert time.monotonic() < deadline, api.get(f"/api/experiments/{experiment_id}/")
        time.sleep(0.1)
    # Group 1 trains, so group 0 has returned without combining: it left that to group 1.
    assert api.get(f"/api/experiments/{experiment_id}/")["status"] == "running"
    killed = _node(stack.nodes["worker"])
    stack.kill("worker")
    cmd = list(WORKER_CMD)
    cmd[cmd.index("-n") + 1] = f"watchdog-{secrets.token_hex(3)}@%h"  # a new name: no orphan requeue
    stack._spawn("watchdog", cmd + [a.replace("{state}", str(stack.tmp_dir)) for a in BEAT_ARGS])
    exp = wait_for(api, experiment_id, timeout=60)
    assert exp["status"] == "succeeded", exp
    groups = {g["group"]: g for g in exp["metrics"]["groups"]}
    assert groups[0]["error"] is None and groups[0]["steps"] == total, groups
    assert _node(groups[1]["worker"]) == killed and groups[1]["finished"] is None, groups
    (error,) = exp["metrics"]["group_errors"]
    assert error.startswith("group 1: lost") and killed in error, error
    # Only a stale heartbeat counts: the group was silent for at least the 10 s window.
    assert int(error.split("stopped reporting ")[1].split(" s ago")[0]) >= 10, error
    assert exp["metrics"]["best_replica"] == 0 and "replica1_val_acc" not in exp["metrics"]
    assert {a["replica"] for a in exp["artifacts"]} == {None, 0}
    # Idempotent: the watchdog keeps running every 2 s and leaves the finished experiment as it is.
    time.sleep(4.5)
    again = api.get(f"/api/experiments/{experiment_id}/")
    assert (again["status"], again["metrics"], again["finished"]) == (
        exp["status"],
        exp["metrics"],
        exp["finished"],
    )
