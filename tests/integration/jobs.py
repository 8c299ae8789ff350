"""Helpers for the integration tests: demo files, waiting on experiments, following the live socket."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.integration.client import Api

FINISHED = ("succeeded", "failed", "cancelled")


def write_digits_npz(path: Path) -> Path:
    """scikit-learn's digits as the NPZ a user would upload (x: N,1,8,8 float32 in [0,1], y, class_names)."""
    from kd_core.data.builtin import load_builtin

    raw = load_builtin("digits", {})
    np.savez_compressed(path, x=raw.x, y=raw.y, class_names=np.array(raw.class_names))
    return path


def wait_for(
    api: Api, experiment_id: int, statuses: tuple[str, ...] = FINISHED, timeout: float = 120
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        exp = api.get(f"/api/experiments/{experiment_id}/")
        if exp["status"] in statuses:
            return exp
        if time.monotonic() > deadline:
            raise AssertionError(f"experiment {experiment_id} still {exp['status']} after {timeout}s: {exp}")
        time.sleep(0.1)


def wait_for_metrics(api: Api, experiment_id: int, min_points: int = 1, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        series = api.get(f"/api/experiments/{experiment_id}/metrics/")["series"]
        if sum(len(v) for v in series.values()) >= min_points:
            return series
        exp = api.get(f"/api/experiments/{experiment_id}/")
        if exp["status"] in FINISHED or time.monotonic() > deadline:
            raise AssertionError(f"no metrics from experiment {experiment_id}: {exp}")
        time.sleep(0.05)


def points(series: dict[str, list[list[float]]]) -> dict[tuple[str, int], float]:
    return {(name, int(step)): value for name, rows in series.items() for step, value in rows}


async def _follow(ws_url: str, api: Api, experiment_id: int, timeout: float) -> tuple[dict, list[dict], int]:
    """As the browser does: subscribe, read the history, merge live messages; after a dropped socket,
    subscribe and read the history again. Returns (merged history series, live messages, reconnects)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    history: dict[str, dict[int, float]] = {}
    messages: list[dict] = []
    reconnects = -1
    deadline = time.monotonic() + timeout
    finished = False
    while not finished and time.monotonic() < deadline:
        reconnects += 1
        try:
            async with connect(ws_url, additional_headers={"Authorization": f"Token {api.token}"}) as ws:
                # Subscribed first, history second: whatever the history misses arrives live.
                got = await asyncio.to_thread(api.get, f"/api/experiments/{experiment_id}/metrics/")
                for name, rows in got["series"].items():
                    history.setdefault(name, {}).update({int(step): value for step, value in rows})
                while time.monotonic() < deadline:
                    try:
                        raw = await asyncio.wait_for(ws.recv(), timeout=2)
                    except TimeoutError:
                        exp = await asyncio.to_thread(api.get, f"/api/experiments/{experiment_id}/")
                        if exp["status"] in FINISHED:
                            finished = True
                            break
                        continue
                    message = json.loads(raw)
                    message["_received"] = time.time()
                    messages.append(message)
                    if message.get("type") == "status" and message.get("status") in FINISHED:
                        finished = True
                        break
        except ConnectionClosed:
            continue
    series = {name: [[step, value] for step, value in sorted(rows.items())] for name, rows in history.items()}
    return series, messages, reconnects


def follow(ws_url: str, api: Api, experiment_id: int, timeout: float = 120) -> tuple[dict, list[dict], int]:
    """Open the experiment's socket, read the history, then collect live messages until it finishes."""
    return asyncio.run(_follow(f"{ws_url}/ws/experiments/{experiment_id}/", api, experiment_id, timeout))


def accuracy_of_downloads(
    api: Api, experiment_id: int, x: np.ndarray, y: np.ndarray, folder: Path
) -> dict[str, Any]:
    """Download the student in each format and measure its accuracy on (x, y), loading it as a user would."""
    import onnxruntime as ort
    import torch

    from kd_core.checkpoints import load_student

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    formats = (
        ("safetensors", ".safetensors"),
        ("torchscript", ".ts"),
        ("onnx", ".onnx"),
        ("exported_program", ".pt2"),
    )
    for fmt, suffix in formats:
        path = folder / f"student-{experiment_id}{suffix}"
        path.write_bytes(api.download(f"/api/experiments/{experiment_id}/download/?format={fmt}"))
        xt = torch.from_numpy(x.astype(np.float32))
        if fmt == "safetensors":
            with torch.no_grad():
                logits = load_student(path)(xt).numpy()
        elif fmt == "torchscript":
            with torch.no_grad():
                logits = torch.jit.load(str(path)).eval()(xt).numpy()
        elif fmt == "exported_program":
            with torch.no_grad():
                logits = torch.export.load(str(path)).module()(xt).numpy()
        else:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            logits = session.run(["logits"], {"input": x.astype(np.float32)})[0]
        out[fmt] = float((logits.argmax(axis=1) == y).mean())
    return out
