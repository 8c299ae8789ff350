"""The running system, end to end on a real stack: job-to-first-metric time, metric latency, upload memory.

- submit -> first metric: from POST /api/experiments/ until the first metric message reaches a WebSocket client;
- metric latency: from the trainer handing a metric to the sink (the message's `time`) to a client receiving it
  (the sink batches about every 0.5 s by design, so this includes the batching wait);
- upload memory: the web (uvicorn) process's resident memory while a 1 GiB NPZ is streamed to
  POST /api/datasets/ (receiving) and until it answers (VmRSS sampled every 20 ms, VmHWM at the end); a file
  above KD_SYNC_INSPECT_MAX_BYTES (64 MiB) is then inspected by the worker: its processes' peak RSS and the
  time until the dataset is ready.
Run: `python -m bench bench_system` (or `make bench`). KD_BENCH_UPLOAD_MB sets the upload size (0: skip it);
KD_BENCH_SYNC_INSPECT=1 makes the stack inspect it in the request instead (the old path, now lean).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, quantile, write_result


async def _first_metric_and_latencies(
    stack: Any, api: Any, config: dict, want_all: bool
) -> tuple[float, list[float]]:
    from websockets.asyncio.client import connect

    from tests.integration.jobs import FINISHED

    t0 = time.time()
    experiment_id = (await asyncio.to_thread(api.post, "/api/experiments/", config))["id"]
    first: float | None = None
    latencies: list[float] = []
    url = f"{stack.ws_url}/ws/experiments/{experiment_id}/"
    async with connect(url, additional_headers={"Authorization": f"Token {api.token}"}) as ws:
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), timeout=120))
            now = time.time()
            if message.get("type") in ("metric", "metrics"):
                if first is None:
                    first = now - t0
                    if not want_all:
                        break
                # A sink flush of several steps is one {"type":"metrics","points":[...]}.
                batch = message.get("points", []) if message["type"] == "metrics" else [message]
                latencies.extend(now - float(p["time"]) for p in batch)
            if message.get("type") == "status" and message.get("status") in FINISHED:
                break
    assert first is not None
    return first, latencies


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _write_big_npz(path: Path, megabytes: int) -> None:
    """A valid NPZ of about `megabytes` MiB (float32 images 1x32x32, 10 classes), written without holding it."""
    n = megabytes * 1024 * 1024 // (32 * 32 * 4)
    x = np.lib.format.open_memmap(
        path.with_suffix(".x.npy"), mode="w+", dtype=np.float32, shape=(n, 1, 32, 32)
    )
    rng = np.random.default_rng(0)
    for start in range(0, n, 8192):
        x[start : start + 8192] = rng.random((min(8192, n - start), 1, 32, 32), dtype=np.float32)
    x.flush()
    y = (np.arange(n) % 10).astype(np.int64)
    np.savez(path, x=x, y=y)
    del x
    path.with_suffix(".x.npy").unlink()


def _max_rss(pids: list[int]) -> tuple[int, int]:
    """The largest (VmRSS, RssAnon) among `pids`: RssAnon leaves out memory-mapped file pages."""
    best, anon = 0, 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        best = max(best, int(fields["VmRSS"].split()[0]) * 1024)
        anon = max(anon, int(fields["RssAnon"].split()[0]) * 1024)
    return best, anon


def _upload_streaming(stack: Any, token: str, path: Path, on_sent: Any) -> tuple[int, float, float, dict]:
    """POST the file as multipart in 1 MiB chunks; returns (HTTP status, seconds sending, seconds total, body).

    `on_sent` is called once the last byte is written: from then on the server parses, stores, inspects.
    """
    boundary = "kdbench" + secrets.token_hex(8)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=600)
    t0 = time.monotonic()
    conn.putrequest("POST", "/api/datasets/")
    conn.putheader("Authorization", f"Token {token}")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    conn.send(head)
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            conn.send(chunk)
    conn.send(tail)
    sent = time.monotonic() - t0
    on_sent()
    response = conn.getresponse()
    body = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, sent, time.monotonic() - t0, body


def bench_upload(stack: Any, api: Any, megabytes: int) -> dict[str, Any]:
    from tests.stack import descendants

    token = api.token
    pid = stack.procs["web"].pid
    worker_pids = [stack.procs["worker"].pid, *descendants(stack.procs["worker"].pid)]
    with tempfile.TemporaryDirectory(dir=stack.tmp_dir) as tmp:
        path = Path(tmp) / "big.npz"
        _write_big_npz(path, megabytes)
        size = path.stat().st_size
        baseline_rss, baseline_hwm = _rss(pid)
        worker_before, worker_anon_before = _max_rss(worker_pids)
        phase = {"now": "sending"}
        peaks = {"sending": baseline_rss, "processing": baseline_rss, "worker": worker_before,
                 "worker_anon": worker_anon_before}  # fmt: skip
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                if phase["now"] != "worker":
                    peaks[phase["now"]] = max(peaks[phase["now"]], _rss(pid)[0])
                rss, anon = _max_rss(worker_pids)
                peaks["worker"] = max(peaks["worker"], rss)
                peaks["worker_anon"] = max(peaks["worker_anon"], anon)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def on_sent() -> None:
            phase["now"] = "processing"

        status, sent_s, total_s, body = _upload_streaming(stack, token, path, on_sent)
        phase["now"] = "worker"
        answered = time.monotonic()
        final = body
        while final.get("status") == "inspecting" and time.monotonic() - answered < 900:
            time.sleep(0.2)
            final = api.get(f"/api/datasets/{body['id']}/")
        settled_s = time.monotonic() - answered
        done.set()
        sampler.join()
        _, hwm = _rss(pid)
    return {
        "file_mib": size / 2**20,
        "http_status": status,
        "final_status": final.get("status"),
        "num_samples": final.get("num_samples"),
        "send_s": sent_s,
        "total_s": total_s,
        "upload_mib_per_s": size / 2**20 / sent_s,
        "web_rss_before_mib": baseline_rss / 2**20,
        "web_peak_rss_while_receiving_mib": peaks["sending"] / 2**20,
        "web_peak_rss_while_inspecting_mib": peaks["processing"] / 2**20,
        "web_vmhwm_before_mib": baseline_hwm / 2**20,
        "web_vmhwm_after_mib": hwm / 2**20,
        "worker_inspect_s": settled_s if status == 202 else 0.0,
        "worker_rss_before_mib": worker_before / 2**20,
        "worker_peak_rss_while_inspecting_mib": peaks["worker"] / 2**20 if status == 202 else None,
        "worker_anon_before_mib": worker_anon_before / 2**20,
        "worker_peak_anon_while_inspecting_mib": peaks["worker_anon"] / 2**20 if status == 202 else None,
    }


def main() -> None:
    from tests.integration.client import Api
    from tests.integration.jobs import write_digits_npz
    from tests.stack import start_stack

    upload_mib = int(os.environ.get("KD_BENCH_UPLOAD_MB", "1024"))
    with tempfile.TemporaryDirectory(prefix="kd-bench-system-") as tmp:
        tmp_dir = Path(tmp)
        # Production's checkpoint period (the test stack's 2 s would make the sink flush early more often).
        env = {"KD_MAX_UPLOAD_MB": str(upload_mib + 64), "KD_CHECKPOINT_EVERY_S": "30"}
        if os.environ.get("KD_BENCH_SYNC_INSPECT") == "1":
            env["KD_SYNC_INSPECT_MAX_BYTES"] = str((upload_mib + 64) * 2**20)
        with start_stack(tmp_dir, extra_env=env) as stack:
            api = Api(stack.url, stack.make_user("bench", "bench-password-123"))
            dataset_id = api.upload(
                "/api/datasets/", {"name": "digits"}, write_digits_npz(tmp_dir / "d.npz")
            )["id"]
            small = {"kind": "train", "dataset": dataset_id, "model": {"arch": "mlp", "hidden": [32]}, "epochs": 2,
                     "log_every": 1}  # fmt: skip
            firsts = []
            for seed in range(5):
                first, _ = asyncio.run(
                    _first_metric_and_latencies(stack, api, {**small, "seed": seed}, False)
                )
                firsts.append(first)
                time.sleep(0.5)
            stream = {**small, "epochs": 300, "log_every": 10}  # a few seconds of training
            _, latencies = asyncio.run(_first_metric_and_latencies(stack, api, stream, True))
            upload = bench_upload(stack, api, upload_mib) if upload_mib > 0 else {}

    rows = [
        ["submit -> first metric on WS (s)", statistics.median(firsts), min(firsts), max(firsts), len(firsts)],
        ["metric latency trainer -> WS p50 (s)", quantile(latencies, 0.5), min(latencies), max(latencies),
         len(latencies)],
        ["metric latency trainer -> WS p95 (s)", quantile(latencies, 0.95), min(latencies), max(latencies),
         len(latencies)],
    ]  # fmt: skip
    print_table(["measure", "median/value", "min", "max", "n"], rows)
    if upload:
        print()
        print_table(["upload", "value"], [[k, v] for k, v in upload.items()])
    path = write_result(
        "system",
        {
            "submit_to_first_metric_s": firsts,
            "metric_latency_s": {"p50": quantile(latencies, 0.5), "p95": quantile(latencies, 0.95),
                                 "n": len(latencies)},
            "upload": upload,
        },
    )  # fmt: skip
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
