"""The shared training loop's overhead: engine step time vs a hand-written loop (digits), a CIFAR-sized resnet's
samples/s, and the loader alone (resident vs streamed through dataset.read by threads)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import print_table, write_result
from kd_core.config import ExperimentConfig
from kd_core.data import load_dataset
from kd_core.data.loader import make_batches
from kd_core.models import build_model
from kd_core.sinks import NullSink
from kd_core.trainer import train_model

REPEATS = 3


def _hand_loop(ds, spec, cfg, steps: int) -> float:
    """The minimal loop a person would write: data on the device, a shuffled index per epoch, Adam, CE."""
    torch.manual_seed(cfg.seed)
    model = build_model(spec, ds.input_shape, ds.num_classes, ds.preprocessing)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x = torch.as_tensor(np.asarray(ds.x_train, dtype=np.float32))
    y = torch.as_tensor(np.asarray(ds.y_train, dtype=np.int64))
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    step = 0
    while step < steps:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 1, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return (time.perf_counter() - start) / steps


def _engine(ds, spec, cfg) -> tuple[float, int]:
    torch.manual_seed(cfg.seed)
    model = build_model(spec, ds.input_shape, ds.num_classes, ds.preprocessing)
    start = time.perf_counter()
    out = train_model(model, ds, cfg, sink=NullSink(), device="cpu")
    return (time.perf_counter() - start) / out.steps, out.steps


def digits_overhead() -> dict:
    ds = load_dataset("digits")
    spec = {"arch": "mlp", "hidden": [64]}
    cfg = ExperimentConfig(epochs=10, batch_size=64, lr=0.001, log_every=50, model=spec)
    engine, hand = [], []
    for _ in range(REPEATS):
        per_step, steps = _engine(ds, spec, cfg)
        engine.append(per_step)
        hand.append(_hand_loop(ds, spec, cfg, steps))
    e, h = min(engine), min(hand)
    return {"engine_step_ms": e * 1e3, "hand_step_ms": h * 1e3, "ratio": e / h, "steps": steps}


def _synthetic_images(n: int, seed: int = 0):
    """Class-dependent 32x32 patterns plus noise, as a digits-shaped Dataset with uint8-like float pixels."""
    base = load_dataset("digits")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    proto = rng.random((10, 3, 32, 32), dtype=np.float32)
    x = np.clip(proto[y] + 0.3 * rng.standard_normal((n, 3, 32, 32), dtype=np.float32), 0, 1).astype(
        np.float32
    )
    n_val = n // 10
    mean = x.mean(axis=(0, 2, 3)).tolist()
    std = x.std(axis=(0, 2, 3)).tolist()
    return dataclasses.replace(
        base, name="synthetic32", x_train=x[n_val:], y_train=y[n_val:], x_val=x[:n_val], y_val=y[:n_val],
        x_test=x[:0], y_test=y[:0], input_shape=(3, 32, 32), is_image=True,
        preprocessing={"mean": mean, "std": std}, fingerprint=f"synthetic32-{n}-{seed}",
    )  # fmt: skip


def resnet_throughput() -> dict:
    ds = _synthetic_images(3000)
    spec = {"arch": "resnet", "depth": 8}
    cfg = ExperimentConfig(
        epochs=1, max_steps=40, batch_size=64, lr=0.01, log_every=10, model=spec, augment="flip_crop"
    )
    torch.manual_seed(0)
    model = build_model(spec, ds.input_shape, ds.num_classes, ds.preprocessing)
    out = train_model(model, ds, cfg, sink=NullSink(), device="cpu")
    return {"samples_per_s": out.samples_per_s, "steps": out.steps}


def loader_alone() -> dict:
    ds = _synthetic_images(6000)
    rows = {}
    for name, limit in (("resident", None), ("streamed", 0)):
        batches = make_batches(
            ds, "train", batch_size=256, seed=0, device="cpu", augment="flip_crop", resident_max_bytes=limit
        )
        batches.get(0)
        start = time.perf_counter()
        n = 0
        for step in range(1, 41):
            n += batches.get(step)[0].shape[0]
        rows[name] = n / (time.perf_counter() - start)
        batches.close()
    return {"resident_images_per_s": rows["resident"], "streamed_images_per_s": rows["streamed"]}


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    digits = digits_overhead()
    resnet = resnet_throughput()
    loader = loader_alone()
    print_table(
        ["measure", "value"],
        [
            ["digits engine step (ms)", digits["engine_step_ms"]],
            ["digits hand-written step (ms)", digits["hand_step_ms"]],
            ["engine / hand", digits["ratio"]],
            ["resnet8 32x32 samples/s (flip_crop)", resnet["samples_per_s"]],
            ["loader resident images/s (32x32, flip_crop)", loader["resident_images_per_s"]],
            ["loader streamed images/s (32x32, flip_crop)", loader["streamed_images_per_s"]],
        ],
    )
    write_result("loop", {"digits": digits, "resnet8": resnet, "loader": loader})


if __name__ == "__main__":
    main()
