"""Codistillation: peer targets, burn-in, stale copies, lockstep, shards, in-process runs, gloo groups, file exchange."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kd_core.codistill import (
    FileExchange,
    MemoryExchange,
    combine_group_results,
    copy_step_at,
    load_saved_dataset,
    make_model,
    peer_logits_for,
    replica_batches,
    replica_loss,
    run_codistill,
    run_codistill_group,
    save_dataset,
    shard_indices,
)
from kd_core.config import parse_config
from kd_core.data import load_dataset
from kd_core.errors import ConfigError
from kd_core.losses import codistillation_loss
from kd_core.sinks import ListSink

ROOT = Path(__file__).resolve().parents[2]
SYNTH = {"n_samples": 300, "n_features": 8, "n_classes": 3}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", options=SYNTH, seed=0)


def config(**codistill):
    base = {
        "kind": "codistill",
        "dataset": "synthetic",
        "data_options": SYNTH,
        "model": {"arch": "mlp", "hidden": [16]},
        "epochs": 50,
        "max_steps": 24,
        "batch_size": 32,
        "lr": 0.01,
        "log_every": 1,
        "seed": 3,
    }
    extra = codistill.pop("top", {})
    cd = {"replicas": 2, "burn_in_steps": 8, "exchange_every": 5, **codistill}
    return parse_config({**base, **extra, "codistill": cd})


# ---------------------------------------------------------------- the loss of one replica


def test_target_is_the_other_replicas_average_never_its_own():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    peers = peer_logits_for(1, logits)
    assert len(peers) == 2 and peers[0] is logits[0] and peers[1] is logits[2]
    total, hard, term = replica_loss(logits[1], y, peers, distill=True, loss="ce", weight=0.5)
    # By hand: mean of the two peers' softmax, cross entropy against replica 1's log-softmax.
    target = (F.softmax(logits[0], 1) + F.softmax(logits[2], 1)) / 2
    by_hand = -(target * F.log_softmax(logits[1], 1)).sum(1).mean()
    assert torch.allclose(term, by_hand, atol=1e-6)
    assert torch.allclose(total, F.cross_entropy(logits[1], y) + 0.5 * by_hand, atol=1e-6)
    with_self = codistillation_loss(logits[1], logits, loss="ce")
    assert not torch.allclose(term, with_self)


@pytest.mark.parametrize("kind", ["ce", "kl", "mse"])
def test_losses_match_hand_computation(kind):
    torch.manual_seed(1)
    z, p1, p2 = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3)
    y = torch.randint(0, 3, (6,))
    _, _, term = replica_loss(z, y, [p1, p2], distill=True, loss=kind)
    t = (F.softmax(p1, 1) + F.softmax(p2, 1)) / 2
    expected = {
        "ce": -(t * F.log_softmax(z, 1)).sum(1).mean(),
        "kl": (t * (t.log() - F.log_softmax(z, 1))).sum(1).mean(),
        "mse": ((z - (p1 + p2) / 2) ** 2).mean(),
    }[kind]
    assert torch.allclose(term, expected, atol=1e-6)


def test_no_gradient_into_peers_and_plain_ce_before_burn_in():
    torch.manual_seed(2)
    z = torch.randn(4, 3, requires_grad=True)
    peer = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    total, hard, term = replica_loss(z, y, [peer], distill=False)
    assert term.item() == 0.0 and total is hard
    total.backward()
    z_plain = z.detach().clone().requires_grad_(True)
    F.cross_entropy(z_plain, y).backward()
    assert torch.equal(z.grad, z_plain.grad)
    assert peer.grad is None
    z.grad = None
    replica_loss(z, y, [peer], distill=True)[0].backward()
    assert peer.grad is None  # the target is detached


# ---------------------------------------------------------------- schedules, orders, shards


def replica_orders(cfg, n):
    """Each replica's batches over a stand-in train split of n samples (the loader's order only)."""
    ds = SimpleNamespace(
        x_train=np.zeros((n, 2), np.float32), y_train=np.zeros(n, np.int64), input_shape=(2,)
    )
    return [replica_batches(cfg, ds, k, "cpu") for k in range(cfg.codistill.replicas)]


def test_copy_schedule():
    got = [copy_step_at(s, 8, 5) for s in range(20)]
    assert got == [-1] * 8 + [8] * 5 + [13] * 5 + [18] * 2


def test_disjoint_shards_are_disjoint_and_cover():
    shards = shard_indices(103, 4, seed=7)
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(103))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    orders = replica_orders(config(replicas=3, data="disjoint"), 103)
    seen = [
        set(np.concatenate([o.batch_indices(s) for s in range(o.steps_per_epoch)]).tolist()) for o in orders
    ]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert set().union(*seen) == set(range(103))


def test_lockstep_walks_the_same_batches_other_modes_do_not():
    same = replica_orders(config(exchange="predictions", replicas=3), 200)
    own = replica_orders(config(replicas=3), 200)
    for step in range(20):
        assert np.array_equal(same[0].batch_indices(step), same[1].batch_indices(step))
        assert np.array_equal(same[0].batch_indices(step), same[2].batch_indices(step))
    assert any(not np.array_equal(own[0].batch_indices(s), own[1].batch_indices(s)) for s in range(20))


def test_config_refuses_predictions_across_processes():
    with pytest.raises(ConfigError, match="predictions"):
        config(exchange="predictions", group_size=2)
    with pytest.raises(ConfigError, match="placement"):
        config(placement="cluster")
    with pytest.raises(ConfigError, match="data 'same'"):
        config(exchange="predictions", data="disjoint")


# ---------------------------------------------------------------- one process, all replicas


def test_in_process_run_burn_in_stale_copies_metrics_and_files(data, tmp_path):
    sink = ListSink()
    result = run_codistill(config(replicas=3), data, out_dir=tmp_path, sink=sink, device="cpu")
    # No distillation term at all during burn-in, one after it.
    dist = dict(sink.series("replica0/train/loss_distill"))
    assert all(dist[s] == 0.0 for s in range(1, 9)) and all(dist[s] > 0 for s in range(9, 25))
    # Copies taken at burn-in, then every 5 steps; the same copies in between (logged after step s-1).
    copies = dict(sink.series("exchange/copy_step"))
    assert copies == {s: float(copy_step_at(s - 1, 8, 5)) for s in range(1, 25)}
    assert {
        "replica2/val/acc",
        "ensemble/val/acc",
        "churn",
        "val/acc",
        "train/loss",
        "lr",
        "samples_per_s",
    } <= sink.names()
    m = result.metrics
    assert 0 <= m["churn"] <= 1 and 0 <= m["ensemble_val_acc"] <= 1
    best = int(m["best_replica"])
    assert m["val_acc"] == m[f"replica{best}_val_acc"] == max(m[f"replica{k}_val_acc"] for k in range(3))
    assert m["steps"] == 24 and not result.stopped
    for k in range(3):
        assert Path(result.files[f"replica{k}.onnx"]).is_file()
    best_weights = load_file(result.files["safetensors"])
    assert all(
        torch.equal(v, load_file(result.files[f"replica{best}.safetensors"])[k])
        for k, v in best_weights.items()
    )
    assert sink.statuses[-1][0] == 1.0


def test_before_burn_in_replicas_train_exactly_as_alone(data, tmp_path):
    together = run_codistill(config(burn_in_steps=1000), data, out_dir=tmp_path / "a", sink=ListSink())
    alone = run_codistill(config(replicas=1), data, out_dir=tmp_path / "b", sink=ListSink())
    a, b = load_file(together.files["replica0.safetensors"]), load_file(alone.files["replica0.safetensors"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_predictions_mode_runs_in_lockstep(data, tmp_path):
    sink = ListSink()
    result = run_codistill(config(exchange="predictions", loss="kl"), data, out_dir=tmp_path, sink=sink)
    assert "exchange/copy_step" not in sink.names()  # no stale copies, no extra forward pass
    dist = dict(sink.series("replica1/train/loss_distill"))
    assert dist[8] == 0.0 and dist[9] > 0.0
    assert result.metrics["steps"] == 24


def test_cancel_stops_and_exports_what_was_trained(data, tmp_path):
    calls = iter(range(1000))
    result = run_codistill(
        config(), data, out_dir=tmp_path, sink=ListSink(), should_stop=lambda: next(calls) >= 5
    )
    assert result.stopped and result.metrics["steps"] == 5
    assert Path(result.files["onnx"]).is_file() and Path(result.files["replica1.safetensors"]).is_file()


def test_resume_from_checkpoint_gives_the_same_weights(data, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    calls = iter(range(1000))
    first = run_codistill(
        config(), data, out_dir=tmp_path / "a", sink=ListSink(), should_stop=lambda: next(calls) >= 11,
        checkpoint_path=ckpt, checkpoint_every_s=-1.0,  # checkpoint after every step
    )  # fmt: skip
    assert first.stopped and ckpt.is_file()
    resumed = run_codistill(config(), data, out_dir=tmp_path / "b", sink=ListSink(), checkpoint_path=ckpt)
    straight = run_codistill(config(), data, out_dir=tmp_path / "c", sink=ListSink())
    a, b = load_file(resumed.files["replica1.safetensors"]), load_file(straight.files["replica1.safetensors"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not ckpt.exists()


def test_a_stopped_run_leaves_a_checkpoint_to_resume_from(data, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    calls = iter(range(1000))
    first = run_codistill(
        config(), data, out_dir=tmp_path / "a", sink=ListSink(), should_stop=lambda: next(calls) >= 7,
        checkpoint_path=ckpt,
    )  # fmt: skip
    assert first.stopped and ckpt.is_file()  # well within CHECKPOINT_EVERY_S: written on the stop
    sink = ListSink()
    resumed = run_codistill(config(), data, out_dir=tmp_path / "b", sink=sink, checkpoint_path=ckpt)
    assert not resumed.stopped and min(step for step, _ in sink.rows) > 7


# ---------------------------------------------------------------- exchange between groups


def test_file_exchange_versions_and_atomic_copies(tmp_path):
    ex = FileExchange(tmp_path)
    assert ex.latest(0) is None and ex.version(0) == 0
    assert ex.publish(0, 10, {"w": torch.ones(2)}) == 1
    assert ex.publish(0, 20, {"w": torch.full((2,), 2.0)}) == 2
    version, state = ex.latest(0)
    assert version == 2 and torch.equal(state["w"], torch.full((2,), 2.0))
    assert ex.latest_entry(0)[1] == 20
    assert ex.latest(1) is None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_dataset_round_trips_for_worker_processes(data, tmp_path):
    save_dataset(data, tmp_path)
    back = load_saved_dataset(tmp_path)
    assert np.array_equal(back.x_train, data.x_train) and np.array_equal(back.y_test, data.y_test)
    assert back.input_shape == data.input_shape and back.class_names == data.class_names


def test_group_of_two_gloo_processes_keeps_workers_identical(data, tmp_path):
    # One replica of 2 data-parallel workers: all-reduced gradients of half batches must leave
    # both workers with the same weights, equal to one process on the whole batch.
    cfg = config(replicas=1, group_size=2)
    result = run_codistill(cfg, data, out_dir=tmp_path / "dp", sink=ListSink())
    folder = tmp_path / "dp" / "codistill-job" / "group0"
    assert (folder / "rank0.digest").read_text() == (folder / "rank1.digest").read_text()
    single = run_codistill(config(replicas=1), data, out_dir=tmp_path / "one", sink=ListSink())
    a, b = load_file(result.files["safetensors"]), load_file(single.files["safetensors"])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_cancelling_a_gloo_group_stops_every_worker_at_the_same_step(data, tmp_path):
    sink = ListSink()
    cfg = config(replicas=1, group_size=2, top={"max_steps": 100_000})
    result = run_codistill(cfg, data, out_dir=tmp_path, sink=sink, should_stop=lambda: len(sink.rows) > 0)
    assert result.stopped and Path(result.files["onnx"]).is_file()
    folder = tmp_path / "codistill-job" / "group0"
    assert (folder / "rank0.digest").read_text() == (folder / "rank1.digest").read_text()
    assert sink.rows[-1][0] < 100_000


def test_worker_processes_reach_a_non_file_exchange_through_the_parent(data, tmp_path):
    # The Celery side may keep copies elsewhere (Redis): a group of 2 worker processes still
    # reads the peer's copy from it and publishes its own to it, through its parent.
    cfg = config(group_size=2, placement="workers", top={"max_steps": 16})
    exchange = MemoryExchange()
    peer = make_model(cfg, data, 1, "cpu")
    exchange.publish(1, 8, peer.state_dict())
    sink = ListSink()
    result = run_codistill_group(cfg, data, 0, exchange, out_dir=tmp_path, sink=sink)
    # Its newest copy reached the exchange: the final weights (earlier ones may be skipped).
    final = load_file(result.files["safetensors"])
    assert exchange.version(0) >= 1
    assert all(torch.equal(v, final[k]) for k, v in exchange.latest(0)[1].items())
    held = dict(sink.series("replica0/exchange/peer1_version"))
    assert held[8] == 0.0 and held[16] == 1.0
    assert dict(sink.series("replica0/train/loss_distill"))[16] > 0
    assert result.metrics["steps"] == 16 and Path(result.files["safetensors"]).name == "replica0.safetensors"


WORKER = textwrap.dedent(
    """
    import json, sys
    from kd_core.codistill import FileExchange, run_codistill_group
    from kd_core.config import parse_config
    from kd_core.data import load_dataset
    from kd_core.sinks import ListSink

    cfg = parse_config(json.loads(sys.argv[1]))
    data = load_dataset("synthetic", options=cfg.data_options, seed=0)
    g = int(sys.argv[2])
    sink = ListSink()
    result = run_codistill_group(cfg, data, g, FileExchange(sys.argv[3]), out_dir=sys.argv[4], sink=sink)
    versions = sink.series(f"replica{g}/exchange/peer{1 - g}_version")
    print(json.dumps({"files": result.files, "metrics": result.metrics, "versions": versions}))
    """
)


def test_two_groups_in_two_processes_share_a_file_exchange(data, tmp_path):
    # Group 1 in a subprocess, group 0 in this process, at the same time: two OS processes
    # whose only link is the shared folder.
    cfg = config(placement="workers")
    exchange_dir = tmp_path / "exchange"
    argv = [
        sys.executable,
        "-c",
        WORKER,
        json.dumps(cfg.to_dict()),
        "1",
        str(exchange_dir),
        str(tmp_path / "g1"),
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sink = ListSink()
        mine = run_codistill_group(
            cfg, data, 0, FileExchange(exchange_dir), out_dir=tmp_path / "g0", sink=sink
        )
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    outs = [
        {
            "files": mine.files,
            "metrics": mine.metrics,
            "versions": sink.series("replica0/exchange/peer1_version"),
        },
        json.loads(out.strip().splitlines()[-1]),
    ]
    ex = FileExchange(exchange_dir)
    # Each group published at burn-in, every 5 steps after it, and once at the end.
    assert ex.version(0) == ex.version(1) == len(range(8, 24, 5)) + 1
    for out in outs:
        held = [v for _, v in out["versions"]]
        assert held == sorted(held)  # copies only ever get newer
        assert out["metrics"]["steps"] == 24
    result = combine_group_results(cfg, data, [o["files"] for o in outs], out_dir=tmp_path / "all")
    m = result.metrics
    assert {"val_acc", "test_acc", "ensemble_val_acc", "ensemble_test_acc", "churn", "best_replica"} <= set(m)
    best = int(m["best_replica"])
    assert m["val_acc"] == pytest.approx(outs[best]["metrics"]["val_acc"], abs=1e-6)
    assert Path(result.files["onnx"]).is_file() and "replica1.torchscript" in result.files
    # A group that died leaves None: the rest still make a result.
    alone = combine_group_results(cfg, data, [outs[0]["files"], None], out_dir=tmp_path / "one")
    assert alone.metrics["best_replica"] == 0 and alone.metrics["churn"] == 0.0


# ---------------------------------------------------------------- kept weights, live figures, progress


def test_each_replica_keeps_its_best_weights_on_validation(data, tmp_path):
    # As train/distill: the exported replica is its best on validation, not its last step
    # (a high learning rate makes the curve wander, so the two differ).
    sink = ListSink()
    cfg = config(top={"lr": 0.3, "max_steps": 40, "log_every": 2})
    result = run_codistill(cfg, data, out_dir=tmp_path, sink=sink)
    for k in range(2):
        curve = dict(sink.series(f"replica{k}/val/acc"))
        kept = int(result.metrics[f"replica{k}_kept_step"])
        assert result.metrics[f"replica{k}_val_acc"] == pytest.approx(max(curve.values()), abs=1e-6)
        assert curve[kept] == pytest.approx(max(curve.values()), abs=1e-6)
    assert any(result.metrics[f"replica{k}_kept_step"] < 40 for k in range(2))  # not simply the last
    best = int(result.metrics["best_replica"])
    assert result.metrics["val_acc"] == pytest.approx(
        max(dict(sink.series(f"replica{best}/val/acc")).values())
    )


def test_a_group_keeps_its_best_weights_and_logs_live_ensemble_figures(data, tmp_path):
    cfg = config(placement="workers", top={"lr": 0.3, "max_steps": 40, "log_every": 2})
    exchange = MemoryExchange()
    exchange.publish(1, 8, make_model(cfg, data, 1, "cpu").state_dict())
    sink = ListSink()
    result = run_codistill_group(cfg, data, 0, exchange, out_dir=tmp_path / "g0", sink=sink)
    curve = dict(sink.series("replica0/val/acc"))
    assert result.metrics["val_acc"] == pytest.approx(max(curve.values()), abs=1e-6)
    assert curve[int(result.metrics["kept_step"])] == pytest.approx(max(curve.values()), abs=1e-6)
    # The exchange's last copy is the kept (exported) one, for groups that lag.
    final = load_file(result.files["safetensors"])
    assert all(torch.equal(v, final[k]) for k, v in exchange.latest(0)[1].items())
    # Group 0 draws the live ensemble/churn curves from the copy it holds; the exact final point
    # is combine_group_results' (not logged here at the last step).
    ens = dict(sink.series("ensemble/val/acc"))
    assert ens and max(ens) < 40 and all(0 <= v <= 1 for v in ens.values())
    assert set(dict(sink.series("churn"))) == set(ens)
    other = ListSink()
    run_codistill_group(cfg, data, 1, exchange, out_dir=tmp_path / "g1", sink=other)
    assert "ensemble/val/acc" not in other.names()  # one group draws them: no clashing points


def test_experiment_progress_is_the_mean_over_groups_and_eta_the_slowest():
    from kd_core.codistill import group_status

    assert group_status({0: 0.5, 1: 1.0, 2: 0.0}, {0: 10.0, 1: None, 2: 30.0}) == (0.5, 30.0)
    assert group_status({0: 0.2}, {}) == (0.2, None)
