"""Tiny real data for the browser tests: an NPZ dataset, a trained teacher exported by kd_core, API calls."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

FEATURES, CLASSES = 16, 3


def make_npz(path: Path, n: int = 600, seed: int = 0) -> Path:
    """Three Gaussian blobs in 16 dimensions: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    centres = rng.normal(0, 2.0, (CLASSES, FEATURES))
    x = (centres[y] + rng.normal(0, 1.0, (n, FEATURES))).astype(np.float32)
    np.savez(path, x=x, y=y.astype(np.int64), class_names=np.array(["ant", "bee", "cat"]))
    return path


def make_teacher(path_dir: Path, npz: Path, hidden: list[int] | None = None) -> Path:
    """Train an mlp on the NPZ for a moment and export it as safetensors with kd_core."""
    import torch
    from torch.nn import functional as F

    from kd_core.export import export_model
    from kd_core.models import build_model

    torch.manual_seed(0)
    with np.load(npz) as d:
        x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    model = build_model({"arch": "mlp", "hidden": hidden or [64, 64]}, (FEATURES,), CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    paths = export_model(
        model, path_dir, basename="teacher", sample_inputs=x[:64], formats=("safetensors",),
        class_names=["ant", "bee", "cat"],
    )  # fmt: skip
    return Path(paths["safetensors"])


def api(base_url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    """A JSON API call with token auth (setup and checks that the browser does not need to make)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base_url + path, data=data, method=method)
    req.add_header("Authorization", f"Token {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def upload(base_url: str, token: str, path: str, fields: dict[str, str], file: Path) -> Any:
    """Multipart upload with token auth."""
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + file.read_bytes()
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    req = urllib.request.Request(base_url + path, data=b"".join(parts), method="POST")
    req.add_header("Authorization", f"Token {token}")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())
