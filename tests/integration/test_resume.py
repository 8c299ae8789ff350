"""A worker killed mid-job (SIGKILL) comes back under its name: the job resumes from its checkpoint, not step 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from tests.integration.client import Api
from tests.integration.jobs import points, wait_for, wait_for_metrics, write_digits_npz
from tests.stack import Stack

LOG_EVERY = 50


def _steps() -> int:
    """Long enough to outlast the first periodic checkpoint: 2 s where the runner takes the interval, else 30 s."""
    import inspect

    from kd_core.runner import run_experiment

    return 12000 if "checkpoint_every_s" in inspect.signature(run_experiment).parameters else 100000


async def _first_live_steps(ws_url: str, token: str, n: int, timeout: float) -> list[int]:
    """The steps of the first `n` live train metrics; reconnects if the server drops an idle socket."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    steps: list[int] = []
    deadline = time.monotonic() + timeout
    while len(steps) < n and time.monotonic() < deadline:
        try:
            async with connect(ws_url, additional_headers={"Authorization": f"Token {token}"}) as ws:
                while len(steps) < n:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    message = json.loads(await asyncio.wait_for(ws.recv(), timeout=left))
                    # A flush of several steps comes as one {"type":"metrics","points":[...]}.
                    batch = [message] if message.get("type") == "metric" else message.get("points", [])
                    if message.get("type") not in ("metric", "metrics"):
                        continue
                    for point in batch:
                        if any(k.startswith("train/") for k in point["values"]):
                            steps.append(int(point["step"]))
        except (ConnectionClosed, TimeoutError):
            continue
    return steps


def test_killed_worker_resumes_the_job(live_stack: Stack, api: Api, tmp_path: Path) -> None:
    npz = write_digits_npz(tmp_path / "digits.npz")
    dataset_id = api.upload("/api/datasets/", {"name": "digits-resume"}, npz)["id"]
    total = _steps()
    config = {"kind": "train", "name": "it-resume", "dataset": dataset_id, "model": {"arch": "mlp", "hidden": [32]},
              "epochs": 5000, "max_steps": total, "log_every": LOG_EVERY}  # fmt: skip
    experiment_id = api.post("/api/experiments/", config)["id"]
    wait_for_metrics(api, experiment_id)

    # Kill once a resumable checkpoint exists (it is written every KD_CHECKPOINT_EVERY_S, or 30 s).
    checkpoint = Path(live_stack.env["KD_STATE_DIR"]) / "jobs" / str(experiment_id) / "train.ckpt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists():
        if (
            api.get(f"/api/experiments/{experiment_id}/")["status"] != "running"
            or time.monotonic() > deadline
        ):
            pytest.skip("the job ended before its first periodic checkpoint (a very fast machine)")
        time.sleep(0.1)
    import torch

    saved_step = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])
    node = live_stack.nodes["worker"]
    live_stack.kill("worker", signal.SIGKILL)
    before = points(api.get(f"/api/experiments/{experiment_id}/metrics/")["series"])
    last_step = max(step for _, step in before)
    assert api.get(f"/api/experiments/{experiment_id}/")["status"] == "running"

    # Listen before the worker comes back, so its very first metrics are seen.
    ws_url = f"{live_stack.ws_url}/ws/experiments/{experiment_id}/"
    loop = asyncio.new_event_loop()
    listener = loop.create_task(_first_live_steps(ws_url, api.token, 3, timeout=90))
    loop.run_until_complete(asyncio.sleep(0.5))
    live_stack.start_worker("worker", node=node)
    first_steps = loop.run_until_complete(listener)
    loop.close()

    exp = wait_for(api, experiment_id, timeout=150)
    assert exp["status"] == "succeeded", exp
    assert exp["attempts"] == 2
    assert first_steps, "no live metrics after the worker came back"
    # Restarted from scratch, the first step logged again would be LOG_EVERY; resumed, the one after the checkpoint.
    assert saved_step < first_steps[0] <= last_step + LOG_EVERY, (saved_step, first_steps, last_step)
    steps = sorted(step for name, step in points(api.get(f"/api/experiments/{experiment_id}/metrics/")["series"])
                   if name == "train/loss")  # fmt: skip
    assert steps == list(range(LOG_EVERY, total + 1, LOG_EVERY)), "a gap or duplicate in the resumed series"
    live_stack.wait_healthy()
