"""A codistillation group checkpoints as one: a stopped (or redelivered) group resumes mid-run and ends as the uninterrupted one."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from kd_core.codistill import FileExchange, MemoryExchange, make_model, run_codistill, run_codistill_group
from kd_core.config import parse_config
from kd_core.data import load_dataset
from kd_core.sinks import ListSink

SYNTH = {"n_samples": 300, "n_features": 8, "n_classes": 3}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", options=SYNTH, seed=0)


def config(max_steps=40, **codistill):
    # keep "last": the exported replica is the last step's, so equal weights mean an equal trajectory (a stop
    # also evaluates where the uninterrupted run does not, which "best" could keep).
    return parse_config({
        "kind": "codistill", "dataset": "synthetic", "data_options": SYNTH, "model": {"arch": "mlp", "hidden": [16]},
        "epochs": 1000, "max_steps": max_steps, "batch_size": 32, "lr": 0.01, "log_every": 1, "seed": 3, "keep": "last",
        "codistill": {"replicas": 2, "burn_in_steps": 8, "exchange_every": 5, "placement": "workers", **codistill},
    })  # fmt: skip


def _same_files(a, b):
    x, y = load_file(a["safetensors"]), load_file(b["safetensors"])
    return all(torch.equal(x[k], y[k]) for k in x)


def _exchange_with_peer(cfg, data, exchange):
    exchange.publish(1, 8, make_model(cfg, data, 1, "cpu").state_dict())
    return exchange


def _newer_copy_before_step(cfg, data, exchange, index, *, stop):
    """should_stop that publishes a newer copy of group 1 just before step `index` (and stops there if `stop`)."""
    calls = itertools.count()
    newer = {k: v * 0.5 for k, v in make_model(cfg, data, 1, "cpu").state_dict().items()}

    def should_stop():
        if next(calls) == index:
            exchange.publish(1, index, newer)
            return stop
        return False

    return should_stop


def test_a_group_in_this_process_resumes_with_the_copies_it_held(data, tmp_path):
    # Group 1 publishes a newer copy while group 0 is stopped at step 12 (copies taken at 8, 13, 18, ...):
    # resumed, group 0 must go on with the copy it held until step 13, as the uninterrupted run does.
    cfg = config()
    exchange = _exchange_with_peer(cfg, data, MemoryExchange())
    stop = _newer_copy_before_step(cfg, data, exchange, 12, stop=True)
    first = run_codistill_group(
        cfg, data, 0, exchange, out_dir=tmp_path / "g", sink=ListSink(), should_stop=stop
    )
    ckpt = tmp_path / "g" / "replica0.ckpt"  # the default: the group's own out_dir, kept across deliveries
    assert first.stopped and first.metrics["steps"] == 12 and ckpt.is_file()
    task_state = torch.load(ckpt, map_location="cpu", weights_only=True)["task"]
    assert task_state["copy_step"] == 8 and task_state["peers"]["versions"] == {"1": 1}
    sink = ListSink()
    resumed = run_codistill_group(cfg, data, 0, exchange, out_dir=tmp_path / "g", sink=sink)
    assert min(s for s, _ in sink.rows) == 13 and not ckpt.exists()
    held = dict(sink.series("replica0/exchange/peer1_version"))
    assert held[13] == 1.0 and held[14] == 2.0  # the restored copy, then the newer one at the copy step
    fresh = _exchange_with_peer(cfg, data, MemoryExchange())
    straight = run_codistill_group(cfg, data, 0, fresh, out_dir=tmp_path / "s", sink=ListSink(),
                                   should_stop=_newer_copy_before_step(cfg, data, fresh, 12, stop=False))  # fmt: skip
    assert _same_files(resumed.files, straight.files)
    assert resumed.metrics["val_acc"] == straight.metrics["val_acc"]


def test_a_group_of_two_processes_resumes_as_one(data, tmp_path):
    cfg = config(max_steps=300, group_size=2)
    exchange = _exchange_with_peer(cfg, data, FileExchange(tmp_path / "ex"))
    sink = ListSink()
    first = run_codistill_group(
        cfg, data, 0, exchange, out_dir=tmp_path / "g", sink=sink,
        should_stop=lambda: any(s >= 20 for s, _ in sink.rows),
    )  # fmt: skip
    stopped_at = int(first.metrics["steps"])
    assert first.stopped and 20 <= stopped_at < 300
    ckpt = tmp_path / "g" / "replica0.ckpt"
    assert ckpt.is_file() and not list((tmp_path / "g").glob("replica0.ckpt.rank*"))
    sink = ListSink()
    resumed = run_codistill_group(cfg, data, 0, exchange, out_dir=tmp_path / "g", sink=sink)
    assert min(s for s, _ in sink.rows) == stopped_at + 1 and not ckpt.exists()
    job = tmp_path / "g" / "codistill-group0-job" / "group0"
    assert (job / "rank0.digest").read_text() == (
        job / "rank1.digest"
    ).read_text()  # both ranks resumed alike
    straight = run_codistill_group(cfg, data, 0, _exchange_with_peer(cfg, data, FileExchange(tmp_path / "ex2")),
                                   out_dir=tmp_path / "s", sink=ListSink())  # fmt: skip
    assert _same_files(resumed.files, straight.files)


def test_groups_started_by_one_call_checkpoint_beside_the_experiment(data, tmp_path):
    cfg = config(max_steps=300, replicas=1, group_size=2, placement="process")
    ckpt = tmp_path / "exp.ckpt"
    sink = ListSink()
    first = run_codistill(cfg, data, out_dir=tmp_path / "a", sink=sink, checkpoint_path=ckpt,
                          should_stop=lambda: len(sink.rows) > 0)  # fmt: skip
    assert first.stopped and ckpt.is_file()
    stopped_at = max(s for s, _ in sink.rows)
    sink = ListSink()
    resumed = run_codistill(cfg, data, out_dir=tmp_path / "a", sink=sink, checkpoint_path=ckpt)
    assert not resumed.stopped and min(s for s, _ in sink.rows) == stopped_at + 1 and not ckpt.exists()
