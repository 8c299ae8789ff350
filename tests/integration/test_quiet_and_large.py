"""On a real stack: a quiet experiment socket stays open; a large upload is ingested by the worker."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.client import Api
from tests.integration.jobs import wait_for, wait_for_metrics
from tests.stack import Stack

SILENCE_S = 7.5  # longer than redis-py's old 5 s read timeout, which closed quiet sockets with 1011


def _large_npz(path: Path, n: int = 4000, features: int = 100, nan_at: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype(np.float32)  # 1.6 MB: above the stack's 1 MiB threshold
    if nan_at is not None:
        x[nan_at, 3] = np.nan
    np.savez(path, x=x, y=np.arange(n) % 5)
    return path


def _settle(api: Api, dataset_id: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = api.get(f"/api/datasets/{dataset_id}/")
        if body["status"] != "ingesting":
            return body
        assert time.monotonic() < deadline, f"dataset {dataset_id} still ingesting after {timeout}s"
        time.sleep(0.2)


def test_large_upload_is_inspected_by_the_worker(api: Api, tmp_path: Path) -> None:
    body = api.upload("/api/datasets/", {"name": "large"}, _large_npz(tmp_path / "large.npz"))
    assert body["status"] == "ingesting" and body["num_samples"] is None
    ready = _settle(api, body["id"])
    assert ready["status"] == "ready" and ready["error"] is None, ready
    assert ready["num_samples"] == 4000 and ready["num_classes"] == 5 and ready["input_shape"] == [100]
    assert ready["splits"] == {"train": 2800, "val": 400, "test": 800}

    bad = api.upload("/api/datasets/", {"name": "bad"}, _large_npz(tmp_path / "bad.npz", nan_at=1234))
    failed = _settle(api, bad["id"])
    assert failed["status"] == "failed", failed
    assert failed["error"] == "bad.npz: 'x' contains NaN or infinite values (first in sample 1234)"


async def _quiet_then_message(ws_url: str, api: Api, experiment_id: int) -> tuple[float, dict]:
    from websockets.asyncio.client import connect

    url = f"{ws_url}/ws/experiments/{experiment_id}/"
    async with connect(url, additional_headers={"Authorization": f"Token {api.token}"}) as ws:
        opened = time.monotonic()
        # Nothing is sent to a queued experiment's group: the socket must simply stay open.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), timeout=SILENCE_S)
        quiet = time.monotonic() - opened
        await asyncio.to_thread(api.post, f"/api/experiments/{experiment_id}/cancel/")
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout=15))
        return quiet, message


def test_a_quiet_socket_stays_open_and_still_delivers(live_stack: Stack, api: Api, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "small.npz"
    np.savez(path, x=rng.normal(size=(200, 8)).astype(np.float32), y=np.arange(200) % 2)
    dataset_id = api.upload("/api/datasets/", {"name": "quiet"}, path)["id"]
    busy_config = {"kind": "train", "name": "it-busy", "dataset": dataset_id, "model": {"arch": "mlp", "hidden": [8]},
                   "epochs": 15000, "log_every": 50}  # fmt: skip
    busy = api.post("/api/experiments/", busy_config)["id"]
    try:
        wait_for_metrics(api, busy)  # the single worker is now taken: the next job waits in the queue
        waiting = api.post("/api/experiments/", {**busy_config, "name": "it-waiting"})["id"]
        assert api.get(f"/api/experiments/{waiting}/")["status"] == "queued"
        quiet, message = asyncio.run(_quiet_then_message(live_stack.ws_url, api, waiting))
        assert quiet >= SILENCE_S - 0.1
        assert message["type"] == "status" and message["status"] == "cancelled", message
    finally:
        api.post(f"/api/experiments/{busy}/cancel/")
        assert wait_for(api, busy, timeout=30)["status"] == "cancelled"


def _hwm(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_the_web_process_does_not_hold_an_upload_many_times_over(
    live_stack: Stack, api: Api, tmp_path: Path
) -> None:
    """The server hands Django the body in pieces, which Django streams to disk; nothing holds it whole."""
    path = tmp_path / "forty.npz"
    np.savez(path, x=np.ones((10_000, 1000), dtype=np.float32), y=np.arange(10_000) % 2)  # 40 MB
    size = path.stat().st_size
    before = _hwm(live_stack.procs["web"].pid)
    body = api.upload("/api/datasets/", {"name": "forty"}, path)
    grew = _hwm(live_stack.procs["web"].pid) - before
    # daphne with Twisted's form parsing took about 13x the file; even daphne without it held the body once.
    assert grew < 3 * size, (
        f"the web process grew by {grew / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB upload"
    )
    assert _settle(api, body["id"])["status"] == "ready"
