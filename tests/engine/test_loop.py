"""The one training loop and its loader: determinism, mid-epoch resume, one checkpoint format, NaN, no cycles."""

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd_core.codistill import MemoryExchange, run_codistill, run_codistill_group
from kd_core.config import ExperimentConfig, parse_config
from kd_core.data import load_dataset
from kd_core.data.loader import iterate, make_batches
from kd_core.errors import TrainingError
from kd_core.loop import CHECKPOINT_FORMAT
from kd_core.models import build_model
from kd_core.sinks import ListSink
from kd_core.trainer import train_model

ROOT = Path(__file__).resolve().parents[2]
SYNTH = {"n_samples": 300, "n_features": 8, "n_classes": 3}


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:320], y_train=ds.y_train[:320])


@pytest.fixture(scope="module")
def synth():
    return load_dataset("synthetic", options=SYNTH, seed=0)


def _model(ds, seed=0):
    torch.manual_seed(seed)
    return build_model({"arch": "mlp", "hidden": [16]}, ds.input_shape, ds.num_classes, ds.preprocessing)


def _train_cfg(**kw):
    return ExperimentConfig(**{"epochs": 3, "batch_size": 32, "lr": 0.01, "log_every": 5, **kw})


def _codistill_cfg(**top):
    base = {"kind": "codistill", "dataset": "synthetic", "data_options": SYNTH, "model": {"arch": "mlp", "hidden": [16]},
            "epochs": 50, "max_steps": 24, "batch_size": 32, "lr": 0.01, "log_every": 1, "seed": 3,
            "codistill": {"replicas": 2, "burn_in_steps": 8, "exchange_every": 5}}  # fmt: skip
    return parse_config({**base, **top})


def _stop_after(n):
    calls = itertools.count(1)
    return lambda: next(calls) > n


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the loader


def test_loader_order_is_a_pure_function_of_seed_and_step(digits):
    a = make_batches(digits, "train", batch_size=32, seed=7, device="cpu", augment="flip_crop")
    b = make_batches(digits, "train", batch_size=32, seed=7, device="cpu", augment="flip_crop")
    steps = list(range(25))
    forward = {s: a.get(s) for s in steps}
    for s in reversed(steps):  # any order of calls, another object: the same batches
        x, y, idx = b.get(s)
        assert (
            torch.equal(x, forward[s][0])
            and torch.equal(y, forward[s][1])
            and torch.equal(idx, forward[s][2])
        )
    # Every epoch visits every sample once, in a new order each epoch.
    per = a.steps_per_epoch
    epoch0 = torch.cat([forward[s][2] for s in range(per)])
    epoch1 = torch.cat([forward[s][2] for s in range(per, 2 * per)])
    assert sorted(epoch0.tolist()) == list(range(320)) and not torch.equal(epoch0, epoch1)
    other = make_batches(digits, "train", batch_size=32, seed=8, device="cpu")
    assert not torch.equal(other.get(0)[2], forward[0][2])


def test_streamed_split_gives_the_same_batches_as_the_resident_one(digits):
    resident = make_batches(digits, "train", batch_size=32, seed=1, device="cpu", augment="flip_crop")
    streamed = make_batches(
        digits,
        "train",
        batch_size=32,
        seed=1,
        device="cpu",
        augment="flip_crop",
        resident_max_bytes=0,
        workers=2,
    )
    assert resident.resident and not streamed.resident
    try:
        for s in range(23):
            for got, want in zip(streamed.get(s), resident.get(s)):
                assert torch.equal(got, want)
    finally:
        streamed.close()
    a = list(iterate(digits, "val", batch_size=50))
    b = list(iterate(digits, "val", batch_size=50, resident_max_bytes=0))
    assert sum(len(x) for x, _, _ in a) == len(digits.x_val)
    assert all(torch.equal(p, q) for u, v in zip(a, b) for p, q in zip(u, v))


# ---------------------------------------------------------------- determinism and resume


def test_two_runs_with_one_seed_are_identical(digits, synth, tmp_path):
    runs = []
    for _ in range(2):
        model = _model(digits)
        train_model(model, digits, _train_cfg(augment="flip_crop"), sink=ListSink(), device="cpu")
        runs.append(model.state_dict())
    assert _same(*runs)
    a = run_codistill(_codistill_cfg(), synth, out_dir=tmp_path / "a", sink=ListSink(), export=False)
    b = run_codistill(_codistill_cfg(), synth, out_dir=tmp_path / "b", sink=ListSink(), export=False)
    assert _same(a.model.state_dict(), b.model.state_dict())


def test_train_resumed_mid_epoch_equals_the_uninterrupted_run(digits, tmp_path):
    cfg = _train_cfg(augment="flip_crop", optimizer="sgd")
    straight = _model(digits)
    train_model(straight, digits, cfg, sink=ListSink(), device="cpu")
    ckpt = tmp_path / "run.ckpt"
    first = train_model(
        _model(digits),
        digits,
        cfg,
        sink=ListSink(),
        should_stop=_stop_after(14),
        device="cpu",
        checkpoint_path=ckpt,
    )
    assert first.stopped and first.steps == 14 and first.steps % 10  # mid-epoch (10 batches an epoch)
    resumed = _model(digits, seed=99)
    out = train_model(resumed, digits, cfg, sink=ListSink(), device="cpu", checkpoint_path=ckpt)
    assert out.resumed_from_step == 14 and out.steps == 30
    assert _same(straight.state_dict(), resumed.state_dict())


def test_codistill_resumed_mid_epoch_equals_the_uninterrupted_run(synth, tmp_path):
    cfg = _codistill_cfg(augment="noise")
    ckpt = tmp_path / "ckpt.pt"
    first = run_codistill(
        cfg, synth, out_dir=tmp_path / "a", sink=ListSink(), should_stop=_stop_after(11), checkpoint_path=ckpt
    )
    assert first.stopped and first.metrics["steps"] == 11 and ckpt.is_file()
    resumed = run_codistill(cfg, synth, out_dir=tmp_path / "b", sink=ListSink(), checkpoint_path=ckpt)
    straight = run_codistill(cfg, synth, out_dir=tmp_path / "c", sink=ListSink())
    for k in range(2):
        a = load_file(resumed.files[f"replica{k}.safetensors"])
        b = load_file(straight.files[f"replica{k}.safetensors"])
        assert _same(a, b)


def test_one_checkpoint_format_with_rng_state_for_every_mode(digits, synth, tmp_path):
    train_ckpt, codistill_ckpt = tmp_path / "t.ckpt", tmp_path / "c.ckpt"
    train_model(_model(digits), digits, _train_cfg(), sink=ListSink(), should_stop=_stop_after(3), device="cpu",
                checkpoint_path=train_ckpt)  # fmt: skip
    run_codistill(_codistill_cfg(), synth, out_dir=tmp_path / "c", sink=ListSink(), should_stop=_stop_after(3),
                  checkpoint_path=codistill_ckpt, export=False)  # fmt: skip
    payloads = [torch.load(p, map_location="cpu", weights_only=True) for p in (train_ckpt, codistill_ckpt)]
    keys = {"format", "config", "step", "modules", "optimizers", "precision", "rng", "loop", "task"}
    for payload in payloads:
        assert set(payload) == keys and payload["format"] == CHECKPOINT_FORMAT and payload["step"] == 3
        assert {"torch", "numpy", "python"} <= set(payload["rng"])
    assert set(payloads[0]["modules"]) == {"model"}
    assert {"replica0", "replica1", "copy0", "copy1"} == set(payloads[1]["modules"])


# ---------------------------------------------------------------- NaN in every mode


def _poisoned(ds):
    x = ds.x_train.copy()
    x[:] = np.nan
    return dataclasses.replace(ds, x_train=x)


def test_nan_stops_every_mode_with_a_training_error(digits, synth, tmp_path):
    bad = _poisoned(digits)
    with pytest.raises(TrainingError, match="training loss became nan at step 1"):
        train_model(_model(digits), bad, _train_cfg(), sink=ListSink(), device="cpu")
    teacher = _model(digits, seed=1).eval()
    with pytest.raises(TrainingError, match="became nan at step 1"):
        train_model(_model(digits), bad, _train_cfg(kind="distill"), teacher_logits_fn=teacher, sink=ListSink(),
                    device="cpu")  # fmt: skip
    bad_synth = _poisoned(synth)
    with pytest.raises(TrainingError, match="replica 0's hard-label loss became nan at step 1"):
        run_codistill(_codistill_cfg(), bad_synth, out_dir=tmp_path / "a", sink=ListSink(), export=False)
    group_cfg = _codistill_cfg(codistill={"replicas": 2, "placement": "workers"})
    with pytest.raises(TrainingError, match="replica 1's hard-label loss became nan at step 1"):
        run_codistill_group(
            group_cfg, bad_synth, 1, MemoryExchange(), out_dir=tmp_path / "g", sink=ListSink()
        )


# ---------------------------------------------------------------- the codistillation package


def test_every_codistill_module_imports_on_its_own_without_cycles():
    modules = ["common", "exchange", "in_process", "group_loop", "combine", "launcher"]
    for name in ["kd_core.loop", "kd_core.runner", "kd_core.codistill"] + [
        f"kd_core.codistill.{m}" for m in modules
    ]:
        proc = subprocess.run(
            [sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    # runner imports codistill only inside run_experiment; codistill never imports the runner.
    text = "\n".join((ROOT / "kd_core" / "codistill" / f"{m}.py").read_text() for m in modules)
    assert "kd_core.runner" not in text and "kd_core.codistill_" not in text
