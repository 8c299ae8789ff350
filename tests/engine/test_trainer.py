"""The training loop on tiny real data: metrics, determinism, schedules, NaN, stop signal, resume."""

import csv
import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

from kd_core.config import ExperimentConfig
from kd_core.data import load_dataset
from kd_core.device import pick_device
from kd_core.errors import ConfigError, DatasetError, TrainingError
from kd_core.models import build_model
from kd_core.sinks import CsvSink, ListSink, MetricsSink, MultiSink, NullSink
from kd_core.trainer import flip_crop, lr_at, train_model


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    # A few hundred samples keep every run well under a second.
    return dataclasses.replace(ds, x_train=ds.x_train[:320], y_train=ds.y_train[:320])


def _model(ds, spec=None, seed=0):
    torch.manual_seed(seed)
    return build_model(
        spec or {"arch": "mlp", "hidden": [16]}, ds.input_shape, ds.num_classes, ds.preprocessing
    )


def _cfg(**kw):
    base = {"epochs": 2, "batch_size": 32, "lr": 0.01, "log_every": 5}
    return ExperimentConfig(**{**base, **kw})


def _stop_after(n):
    calls = itertools.count(1)
    return lambda: next(calls) > n


def test_train_logs_the_documented_metrics_and_keeps_the_best_weights(digits):
    sink = ListSink()
    model = _model(digits)
    out = train_model(model, digits, _cfg(), sink=sink, device="cpu")
    assert {"train/loss", "train/acc", "lr", "samples_per_s", "val/loss", "val/acc", "epoch"} <= sink.names()
    assert "train/loss_soft" not in sink.names()
    assert out.steps == 20 and out.epochs == 2 and not out.stopped
    assert [s for s, _ in sink.series("train/loss")] == [5, 10, 15, 20]
    assert [v for _, v in sink.series("epoch")] == [1.0, 2.0]
    val_accs = [v for _, v in sink.series("val/acc")]
    assert out.best["val_acc"] == max(val_accs)
    # The model holds the best weights, and the returned state dict is those weights.
    for k, v in model.state_dict().items():
        assert torch.equal(v, out.state_dict[k])
    assert sink.statuses[-1] == (1.0, 0.0)
    assert all(0.0 <= p <= 1.0 for p, _ in sink.statuses)


def test_distill_logs_hard_and_soft_losses(digits):
    teacher = _model(digits, {"arch": "mlp", "hidden": [32]}, seed=1).eval()
    sink = ListSink()
    out = train_model(
        _model(digits),
        digits,
        _cfg(kind="distill", teacher="t"),
        teacher_logits_fn=teacher,
        sink=sink,
        device="cpu",
    )
    assert {"train/loss_hard", "train/loss_soft", "val/agreement"} <= sink.names()
    assert "val_agreement" in out.best
    # total = alpha T^2 soft + (1 - alpha) hard, averaged the same way over each interval.
    for _, row in sink.rows:
        if "train/loss" in row:
            want = 0.9 * 16 * row["train/loss_soft"] + 0.1 * row["train/loss_hard"]
            assert row["train/loss"] == pytest.approx(want, rel=1e-4)


def test_unlabeled_transfer_set_uses_agreement_with_the_teacher(digits):
    transfer = dataclasses.replace(digits, y_train=None, y_val=None)
    teacher = _model(digits, {"arch": "mlp", "hidden": [32]}, seed=1).eval()
    sink = ListSink()
    out = train_model(
        _model(digits), transfer, _cfg(kind="distill"), teacher_logits_fn=teacher, sink=sink, device="cpu"
    )
    assert "val/agreement" in sink.names() and "val/acc" not in sink.names()
    assert "train/acc" not in sink.names()
    assert [v for _, v in sink.series("train/loss_hard")] == [0.0] * 4
    assert 0.0 <= out.best["val_agreement"] <= 1.0
    with pytest.raises(DatasetError, match="no labels"):
        train_model(_model(digits), transfer, _cfg(), sink=ListSink(), device="cpu")


@pytest.mark.parametrize("kw", [{}, {"optimizer": "sgd", "augment": "flip_crop", "kind": "distill"}])
def test_same_config_and_seed_give_the_same_numbers(digits, kw):
    teacher = _model(digits, seed=3).eval() if kw else None
    runs = []
    for _ in range(2):
        sink = ListSink()
        model = _model(digits)
        train_model(model, digits, _cfg(**kw), teacher_logits_fn=teacher, sink=sink, device="cpu")
        runs.append(
            ([(s, {k: v for k, v in r.items() if k != "samples_per_s"}) for s, r in sink.rows], model)
        )
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].state_dict().items():
        assert torch.equal(v, runs[1][1].state_dict()[k])
    other = ListSink()
    train_model(
        _model(digits), digits, _cfg(seed=5, **kw), teacher_logits_fn=teacher, sink=other, device="cpu"
    )
    assert other.series("train/loss") != [(s, r["train/loss"]) for s, r in runs[0][0] if "train/loss" in r]


def test_schedules():
    cfg = _cfg(lr=0.1, schedule="cosine")
    assert lr_at(cfg, 0, 100, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 50, 100, 10) == pytest.approx(0.05)
    assert lr_at(cfg, 100, 100, 10) == pytest.approx(0.0)
    step = _cfg(lr=0.1, schedule="step", lr_step_epochs=2, lr_gamma=0.5)
    assert [lr_at(step, s, 100, 10) for s in (0, 19, 20, 40)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert lr_at(_cfg(lr=0.1, schedule="none"), 77, 100, 10) == 0.1


def test_sgd_step_schedule_in_the_logged_lr(digits):
    sink = ListSink()
    cfg = _cfg(optimizer="sgd", schedule="step", lr_step_epochs=1, lr_gamma=0.1, epochs=2, log_every=1)
    train_model(_model(digits), digits, cfg, sink=sink, device="cpu")
    lrs = dict(sink.series("lr"))
    assert lrs[1] == pytest.approx(0.01) and lrs[10] == pytest.approx(0.01)
    assert lrs[11] == pytest.approx(0.001) and lrs[20] == pytest.approx(0.001)


def test_max_steps_caps_the_run_mid_epoch(digits):
    sink = ListSink()
    out = train_model(_model(digits), digits, _cfg(max_steps=7), sink=sink, device="cpu")
    assert out.steps == 7 and out.epochs == pytest.approx(0.7)
    assert sink.series("val/acc")[-1][0] == 7  # the cut-short run is still validated


def test_flip_crop_gives_shifted_or_flipped_crops():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8) + 1
    gen = torch.Generator().manual_seed(0)
    out = flip_crop(x, gen)
    assert out.shape == x.shape
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    for b in range(2):
        views = [padded[b, :, oy : oy + 8, ox : ox + 8] for oy in range(3) for ox in range(3)]
        views += [v.flip(-1) for v in views]
        assert any(torch.equal(out[b], v) for v in views)


def test_augment_must_fit_the_data():
    ds = load_dataset("synthetic", options={"n_samples": 200})
    model = _model(ds)
    with pytest.raises(ConfigError, match="image"):
        train_model(model, ds, _cfg(augment="flip_crop"), sink=ListSink(), device="cpu")
    out = train_model(model, ds, _cfg(augment="noise"), sink=ListSink(), device="cpu")
    assert math.isfinite(out.best["val_loss"])


def test_nan_loss_raises_a_readable_training_error(digits):
    model = _model(digits)
    with torch.no_grad():
        model.classifier.weight.fill_(3e38)  # logits overflow to inf: the loss is NaN at the first step
    with pytest.raises(TrainingError, match=r"training loss became nan at step 1"):
        train_model(model, digits, _cfg(), sink=ListSink(), device="cpu")


def test_nan_teacher_names_the_soft_loss(digits):
    def broken_teacher(x):
        return torch.full((x.shape[0], 10), float("nan"))

    with pytest.raises(TrainingError, match=r"soft loss became nan at step 1"):
        train_model(
            _model(digits),
            digits,
            _cfg(kind="distill"),
            teacher_logits_fn=broken_teacher,
            sink=ListSink(),
            device="cpu",
        )


def test_stop_signal_returns_what_was_trained(digits):
    sink = ListSink()
    model = _model(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_model(model, digits, _cfg(), sink=sink, should_stop=_stop_after(3), device="cpu")
    assert out.stopped and out.steps == 3
    assert "val_acc" in out.best  # validated once on the way out
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_resume_continues_the_same_run(digits, tmp_path):
    cfg = _cfg(epochs=3, kind="distill", augment="flip_crop", optimizer="sgd")
    teacher = _model(digits, seed=3).eval()
    full = _model(digits)
    train_model(full, digits, cfg, teacher_logits_fn=teacher, sink=ListSink(), device="cpu")

    ckpt = tmp_path / "run.ckpt"
    first = train_model(
        _model(digits),
        digits,
        cfg,
        teacher_logits_fn=teacher,
        sink=ListSink(),
        should_stop=_stop_after(13),
        device="cpu",
        checkpoint_path=ckpt,
    )
    assert first.stopped and first.steps == 13 and ckpt.is_file()
    # A fresh process would build a fresh model: the checkpoint carries everything else.
    sink = ListSink()
    resumed_model = _model(digits, seed=99)
    second = train_model(
        resumed_model, digits, cfg, teacher_logits_fn=teacher, sink=sink, device="cpu", checkpoint_path=ckpt
    )
    assert second.resumed_from_step == 13 and second.steps == 30 and not second.stopped
    assert min(s for s, _ in sink.rows) > 13
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k
    # A checkpoint of another config is ignored, not resumed.
    other = train_model(
        _model(digits), digits, _cfg(epochs=1), sink=ListSink(), device="cpu", checkpoint_path=ckpt
    )
    assert other.resumed_from_step is None and other.steps == 10


def test_a_buffering_sink_is_flushed_before_each_checkpoint(digits, tmp_path):
    ckpt = tmp_path / "run.ckpt"

    class Buffering(ListSink):
        """Like a worker's sink: rows count as stored only once flushed."""

        def __init__(self) -> None:
            super().__init__()
            self.flushes: list[tuple[int, bool]] = []

        def flush(self) -> None:
            self.flushes.append((len(self.rows), ckpt.exists()))

    sink = Buffering()
    out = train_model(
        _model(digits),
        digits,
        _cfg(),
        sink=sink,
        should_stop=_stop_after(7),
        device="cpu",
        checkpoint_path=ckpt,
    )
    assert out.stopped and ckpt.is_file()
    # Flushed before the first checkpoint was written, and the last flush held every row (the stop's
    # validation included): the checkpoint is never ahead of the stored series.
    assert sink.flushes[0][1] is False
    assert sink.flushes[-1][0] == len(sink.rows) and any(s == 7 for s, _ in sink.rows)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA"):
            pick_device("cuda")
    with pytest.raises(ConfigError, match="device must be"):
        pick_device("tpu")


def test_csv_and_multi_sinks_write_name_step_value_rows(tmp_path):
    listed = ListSink()
    sink = MultiSink(CsvSink(tmp_path / "m.csv"), listed, NullSink())
    sink.log(10, {"train/loss": 0.5, "lr": 0.001})
    sink.status(0.5, 3.0)
    sink.close()
    rows = list(csv.reader((tmp_path / "m.csv").open()))
    assert rows == [["name", "step", "value"], ["train/loss", "10", "0.5"], ["lr", "10", "0.001"]]
    assert listed.statuses == [(0.5, 3.0)] and listed.closed
    assert all(isinstance(s, MetricsSink) for s in (listed, sink, NullSink()))
