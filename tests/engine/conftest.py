"""Tiny dataset files shared by the engine tests (NPZ, CSV, ZIP of class folders), written into tmp_path."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


def _png(
    color: tuple[int, ...] | int = (255, 0, 0), size: tuple[int, int] = (8, 8), mode: str = "RGB"
) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def png_bytes() -> Callable[..., bytes]:
    """png_bytes(color=(r, g, b), size=(w, h), mode="RGB") -> the bytes of a solid-colour PNG."""
    return _png


@pytest.fixture
def make_zip(tmp_path: Path) -> Callable[..., Path]:
    """make_zip({member name: bytes}, name="data.zip") -> path of a ZIP holding those members."""

    def make(members: dict[str, bytes], name: str = "data.zip") -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for member, data in members.items():
                zf.writestr(member, data)
        return path

    return make


@pytest.fixture
def tiny_arrays() -> dict[str, np.ndarray]:
    """60 samples, 5 features, 3 well separated classes (20 each): any model learns it in a few steps."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    centers = np.eye(3, 5) * 4.0
    x = (centers[y] + rng.normal(0, 0.5, size=(60, 5))).astype(np.float32)
    return {"x": x, "y": y.astype(np.int64)}


@pytest.fixture
def tiny_npz(tmp_path: Path, tiny_arrays: dict[str, np.ndarray]) -> Path:
    """Vector NPZ: x (60, 5) float32, y in {0, 1, 2}, class_names a/b/c."""
    path = tmp_path / "tiny.npz"
    np.savez(path, **tiny_arrays, class_names=np.array(["a", "b", "c"]))
    return path


@pytest.fixture
def tiny_image_npz(tmp_path: Path) -> Path:
    """Image NPZ: x (40, 3, 8, 8) in [0, 1], 2 classes told apart by brightness."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(2), 20)
    x = rng.uniform(0, 0.5, size=(40, 3, 8, 8)).astype(np.float32) + 0.5 * y[:, None, None, None]
    path = tmp_path / "tiny_images.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def digits_npz(tmp_path: Path) -> Path:
    """scikit-learn's digits as an uploaded NPZ: x (1797, 1, 8, 8) in [0, 1], y 0..9, class_names."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    path = tmp_path / "digits.npz"
    np.savez_compressed(
        path,
        x=(bunch.images / 16.0).astype(np.float32)[:, None],
        y=bunch.target.astype(np.int64),
        class_names=np.array([str(c) for c in bunch.target_names]),
    )
    return path


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    """40 rows: numeric columns f1, f2, f3 and a string `label` column (cat / dog)."""
    rng = np.random.default_rng(2)
    lines = ["f1,f2,f3,label"]
    for i in range(40):
        label = "dog" if i % 2 else "cat"
        base = 3.0 if label == "dog" else -3.0
        f = base + rng.normal(0, 0.5, size=3)
        lines.append(f"{f[0]:.4f},{f[1]:.4f},{f[2]:.4f},{label}")
    path = tmp_path / "tiny.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_zip(make_zip: Callable[..., Path]) -> Path:
    """Class folders red/ and blue/, 10 solid 8x8 RGB PNGs each (slightly varied shades)."""
    members = {}
    for i in range(10):
        members[f"red/{i}.png"] = _png((200 + i * 5, 10, 10))
        members[f"blue/{i}.png"] = _png((10, 10, 200 + i * 5))
    return make_zip(members, "tiny.zip")
