"""The streamed loader's host work: flip_crop on raw uint8 batches, float32 in one pass, reused buffers."""

from __future__ import annotations

import numpy as np
import torch

from kd_core.data import load_dataset
from kd_core.data.loader import apply_flip_crop, flip_crop_np, flip_crop_params, make_batches
from kd_core.data.store import ingest


def _gather(x: torch.Tensor, pad, oy, ox, flip) -> torch.Tensor:
    """flip_crop as one padded gather (the device path), written out here as the reference."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    cols = torch.arange(w)[None]
    cols = ox + torch.where(flip, (w - 1) - cols, cols)
    rows = oy + torch.arange(h)[None]
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def test_host_flip_crop_matches_the_gather_in_uint8_and_scaled_float32():
    x = torch.randint(0, 256, (40, 3, 24, 20), dtype=torch.uint8)
    pad, oy, ox, flip = flip_crop_params(40, 24, 20, torch.Generator().manual_seed(3))
    want = _gather(x, pad, oy, ox, flip)
    assert flip.any() and not flip.all() and len(set(oy.view(-1).tolist())) > 1
    got = flip_crop_np(x.numpy(), pad, oy.numpy(), ox.numpy(), flip.numpy())
    assert got.dtype == np.uint8 and torch.equal(torch.from_numpy(got), want)
    scaled = apply_flip_crop(x, pad, oy, ox, flip, 1 / 255)
    assert scaled.dtype == torch.float32 and torch.equal(scaled, want.float() * (1 / 255))
    # The gather (what a GPU runs; here on a dtype the numpy path leaves to it) gives the same crops.
    gathered = apply_flip_crop(x.double(), pad, oy, ox, flip)
    assert gathered.dtype == torch.float64 and torch.equal(gathered, want.double())


def _uint8_store(tmp_path, n=240, side=16):
    """A ZIP of PNGs in class folders: a uint8 store whose inputs are pixels / 255."""
    import io
    import zipfile

    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(tmp_path / "u8.zip", "w") as zf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
            zf.writestr(f"c{i % 4}/{i:04d}.png", buf.getvalue())
    ingest(tmp_path / "u8.zip", tmp_path / "store", options={"image_size": side})
    ds = load_dataset(tmp_path / "store")
    assert ds.x_scale == 1 / 255
    return ds


def test_streamed_uint8_store_equals_resident_with_flip_crop(tmp_path):
    ds = _uint8_store(tmp_path)
    kw = dict(batch_size=32, seed=5, device="cpu", augment="flip_crop")
    resident = make_batches(ds, "train", **kw)
    streamed = make_batches(ds, "train", **kw, resident_max_bytes=0, workers=2)
    assert resident.resident and not streamed.resident
    try:
        held = [streamed.get(s) for s in range(12)]  # kept: reused buffers must not overwrite them
        for s in reversed(range(12)):
            want = resident.get(s)
            assert want[0].dtype == torch.float32 and float(want[0].max()) <= 1.0
            for got, exp in zip(held[s], want):
                assert torch.equal(got, exp)
        for s in range(12, 30):  # batches dropped as they go: buffers are reused, results unchanged
            for got, exp in zip(streamed.get(s), resident.get(s)):
                assert torch.equal(got, exp)
    finally:
        streamed.close()


def test_evaluation_batches_are_bounded_by_input_bytes(tmp_path, monkeypatch):
    """1,024 rows at 224 px would be 600 MB of float32 input (and GBs of activations) per eval batch."""
    from kd_core import trainer
    from kd_core.data import loader

    ds = _uint8_store(tmp_path)
    per_row = 4 * int(np.prod(ds.input_shape))
    assert loader.eval_batch_size(ds) == min(1024, loader.EVAL_BATCH_BYTES // per_row)
    budget = 5 * per_row  # a budget of five rows, so this small store shows the bound
    monkeypatch.setattr(loader, "EVAL_BATCH_BYTES", budget)
    monkeypatch.setattr(trainer, "EVAL_BATCH_BYTES", budget)
    assert loader.eval_batch_size(ds, budget_bytes=budget) == 5

    seen: list[int] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return x.flatten(1)[:, :4]

    x, _ = loader.read_rows(ds, "train", np.arange(12))
    trainer.predict_logits(Probe(), torch.from_numpy(np.asarray(x, np.float32)))
    assert seen and max(seen) <= 5 and sum(seen) == 12
