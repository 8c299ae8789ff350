"""One experiment end to end: build the student, train or distill it, measure it, export it, write result.json."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kd_core.atomic import atomic_write
from kd_core.cache import CachedLogits, TeacherLogitCache
from kd_core.config import ExperimentConfig
from kd_core.device import autocast_dtype, pick_device
from kd_core.errors import ConfigError, DatasetError
from kd_core.result import RunResult
from kd_core.sinks import MetricsSink
from kd_core.trainer import evaluate_split, train_model

if TYPE_CHECKING:
    from kd_core.data import Dataset

# The data split does not follow the training seed: runs with different seeds then compare on the
# same test set, and a teacher trained here never sees the test set of a later distillation.
SPLIT_SEED = 0


class TimeLimit:
    """`should_stop` with a running-time limit: True once `seconds` have passed, or when `inner` says so.

    `reached` tells a caller that the limit (not `inner`) ended the run; `seconds` None or <= 0 means no limit
    (a non-positive budget left over from earlier attempts stops at the first check instead: see `expired`).
    """

    def __init__(self, inner: Callable[[], bool], seconds: float | None, *, expired: bool = False) -> None:
        self.inner = inner
        self.deadline = None if seconds is None else time.monotonic() + max(float(seconds), 0.0)
        self.reached = expired

    def __call__(self) -> bool:
        if not self.reached and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reached = True
        return self.reached or bool(self.inner())


def load_experiment_dataset(config: ExperimentConfig, source: str | Path | None = None) -> Dataset:
    """The dataset of `config` (or of `source`, a name or path that replaces config.dataset), split with SPLIT_SEED."""
    from kd_core.data import load_dataset

    return load_dataset(
        source if source is not None else config.dataset,
        options=config.data_options,
        seed=SPLIT_SEED,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
    )


def run_experiment(
    config: ExperimentConfig,
    *,
    dataset: Any,
    teacher: Any | None = None,
    out_dir: str | Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
    export: bool = True,
) -> RunResult:
    """Run `config` on `dataset` and write out_dir/result.json plus the student's exports.

    A run stopped by `should_stop`, or by `config.time_limit_s` (then `metrics["stopped_by"]` is
    "time_limit"), still measures and exports what it trained so far.
    `cache_dir` keeps teacher logits between runs; without it they are kept for this run only.
    `checkpoint_path` is a resumable training checkpoint, written every `checkpoint_every_s` and when
    stopped, resumed from when present, and removed once the run has finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(device)
    autocast_dtype(device, config.precision)  # a precision this device cannot run is refused before any work
    started = time.monotonic()
    limit = TimeLimit(should_stop, config.time_limit_s)
    should_stop = limit

    if config.kind == "codistill":
        from kd_core.codistill import run_codistill  # imported lazily: most runs never need it

        result = run_codistill(
            config,
            dataset,
            out_dir=out_dir,
            sink=sink,
            should_stop=should_stop,
            device=device,
            checkpoint_path=checkpoint_path,
            checkpoint_every_s=checkpoint_every_s,
            export=export,
        )
        result.metrics.setdefault("train_time_s", time.monotonic() - started)
        result.metrics.setdefault("kept", config.keep)  # each replica's best-on-validation or last weights
        if limit.reached and result.stopped:
            result.metrics["stopped_by"] = "time_limit"
        _write_result(out_dir, config, result)
        return result

    if config.kind not in ("train", "distill"):
        raise ConfigError(f"unknown experiment kind {config.kind!r}")
    distill = config.kind == "distill"
    # A soft-label teacher is a file of predictions (kd_core/soft_labels.py), not a model.
    soft_labels = bool(getattr(teacher, "soft_labels", False))
    if distill:
        if teacher is None:
            raise ConfigError("kind 'distill' needs a teacher checkpoint")
        from kd_core.checkpoints import check_teacher_fits

        if soft_labels:
            if config.augment != "none":
                raise ConfigError(
                    "a soft-label teacher has predictions for the stored samples only and cannot score "
                    f"augmented inputs: use augment 'none' (got {config.augment!r})"
                )
            teacher.bind(dataset)  # its samples, classes and coverage against this dataset
        check_teacher_fits(teacher, dataset)
        if dataset.num_classes is None:  # an unlabeled transfer set takes the teacher's classes
            dataset = dataset.with_num_classes(int(teacher.num_classes))
        teacher.to(device).eval()
    if dataset.num_classes is None:
        raise DatasetError(
            "this dataset has no labels: train a student on it only by distilling from a teacher"
        )

    from kd_core.models import build_model, model_stats

    torch.manual_seed(config.seed)  # the student's initial weights follow the seed
    model = build_model(
        config.model, tuple(dataset.input_shape), int(dataset.num_classes), dataset.preprocessing
    )
    init_metrics: dict[str, Any] = {}
    if config.init is not None:
        from kd_core.checkpoints import load_init_weights

        # Pretrained weights (a path here: the web app resolves a checkpoint id to its file first).
        init_metrics = load_init_weights(model, config.init, preprocessing=config.init_preprocessing)

    cached: dict[str, CachedLogits] = {}
    # No cache_dir: a private temporary directory, removed below.
    cache = TeacherLogitCache(cache_dir) if distill else None
    try:
        if distill:
            # Fixed inputs: the teacher runs once per split, and not again in a later run with the same cache.
            from kd_core.data.loader import split_size

            splits = ("val", "test") if config.augment != "none" else ("train", "val", "test")
            for split in splits:
                if split_size(dataset, split):
                    cached[split] = cache.split_logits(teacher, dataset, split, device=device)

        if config.devices > 1:
            # N data-parallel processes: the codistillation group machinery with one group and this step.
            from kd_core.codistill import run_data_parallel

            outcome = run_data_parallel(
                config, dataset, model, out_dir=out_dir, sink=sink, should_stop=should_stop, device=device,
                teacher=teacher if distill else None,
                teacher_logits={k: v for k, v in cached.items() if k != "test"},
                partial_teacher=soft_labels, checkpoint_path=checkpoint_path,
                checkpoint_every_s=checkpoint_every_s,
            )  # fmt: skip
        else:
            outcome = train_model(
                model,
                dataset,
                config,
                teacher_logits_fn=teacher.logits if distill else None,
                teacher_logits={k: v for k, v in cached.items() if k != "test"} if distill else None,
                sink=sink,
                should_stop=should_stop,
                device=device,
                checkpoint_path=checkpoint_path,
                checkpoint_every_s=checkpoint_every_s,
                partial_teacher=soft_labels,
            )
        test = evaluate_split(
            model, dataset, "test", device=device, teacher_logits=cached.get("test"),
            temperature=config.temperature, partial_teacher=soft_labels, precision=config.precision,
        )  # fmt: skip
        teacher_val = (
            evaluate_split(
                model,
                dataset,
                "val",
                device=device,
                teacher_logits=cached["val"],
                partial_teacher=soft_labels,
                precision=config.precision,
            )
            if distill and "teacher_acc" not in test and "val" in cached
            else {}
        )
    finally:
        if cache is not None:
            cache.close()
    stats = model_stats(model)
    metrics: dict[str, Any] = {
        "val_acc": outcome.best.get("val_acc"),
        "val_loss": outcome.best.get("val_loss"),
        "test_acc": test.get("acc"),
        "test_loss": test.get("loss"),
        "student_params": stats["params"],
        "student_size_bytes": stats["size_bytes"],
        "student_latency_ms": stats["cpu_latency_ms"],
        **_latency_metrics("student", stats),
        "steps": outcome.steps,
        "epochs": outcome.epochs,
        "best_epoch": outcome.best.get("epoch"),
        "kept": config.keep,  # which weights these figures and the exports are: "best" or "last"
        "train_time_s": outcome.train_time_s,
        "samples_per_s": outcome.samples_per_s,
        "device": str(device),
        **outcome.run_metrics(),  # precision, peak GPU memory (or the process's peak RSS), notes
        **init_metrics,
    }
    if config.devices > 1:
        metrics["devices"] = config.devices  # data-parallel processes (the peak memory is rank 0's)
    if distill:
        metrics |= _teacher_metrics(teacher, dataset, test, teacher_val, stats)
        metrics["val_agreement"] = outcome.best.get("val_agreement")
        metrics["test_agreement"] = test.get("agreement")
        # Fidelity next to accuracy (Stanton et al. 2021): mean KL(teacher || student) at T = 1.
        metrics["val_kl_to_teacher"] = outcome.best.get("val_kl_to_teacher")
        metrics["test_kl_to_teacher"] = test.get("kl_to_teacher")
        metrics["method"] = config.method
        if soft_labels:
            metrics["teacher_coverage"] = teacher.coverage  # of the train split; uncovered: labels only
            metrics["test_teacher_coverage"] = test.get("teacher_coverage", 1.0 if "agreement" in test else 0)

    files: dict[str, Path | str] = {}
    if export:
        from kd_core.data.loader import sample_inputs
        from kd_core.export import export_model

        files = export_model(
            model,
            out_dir,
            basename="student",
            class_names=list(dataset.class_names),
            sample_inputs=sample_inputs(dataset, 16),
            extra_metadata={"experiment": {"kind": config.kind, "name": config.name, "seed": config.seed}},
        )
    result = RunResult(metrics=metrics, files=files, stopped=outcome.stopped, model=model)
    if limit.reached and outcome.stopped:
        metrics["stopped_by"] = "time_limit"
    _write_result(out_dir, config, result)
    if checkpoint_path is not None and not outcome.stopped:
        Path(checkpoint_path).unlink(missing_ok=True)  # done: a requeue must not resume a finished run
    return result


def _teacher_metrics(
    teacher: Any, dataset: Any, test: dict[str, float], val: dict[str, float], student: dict[str, Any]
) -> dict[str, Any]:
    """Teacher accuracy (test split, else val; measured from its cached logits), size and CPU latency,
    and the ratios to the student."""
    out: dict[str, Any] = {}
    for split, metrics in (("test", test), ("val", val)):
        if "teacher_acc" in metrics:
            out["teacher_acc"] = metrics["teacher_acc"]
            out["teacher_acc_split"] = split
            break
    params = teacher.num_params
    out["teacher_params"] = int(params) if params else None
    latency, size = _teacher_cost(teacher, tuple(dataset.input_shape))
    out["teacher_size_bytes"] = size
    teacher_ms = latency["cpu_latency_ms"] if latency else None
    out["teacher_latency_ms"] = teacher_ms
    if latency:
        out |= _latency_metrics("teacher", latency)
    if params and student["params"]:
        out["compression"] = params / student["params"]
    if teacher_ms and student["cpu_latency_ms"]:
        out["speedup"] = teacher_ms / student["cpu_latency_ms"]
    return out


def _latency_metrics(who: str, stats: dict[str, Any]) -> dict[str, Any]:
    """The spread and conditions of a model_stats latency, beside `<who>_latency_ms` (the median).

    `latency_batch_size` and `latency_threads` are shared: student and teacher are timed the same way.
    `<who>_latency_overhead` is the share of the single-sample time that is fixed per-call cost (None: not measured).
    """
    return {
        f"{who}_latency_ms_p10": stats["cpu_latency_p10_ms"],
        f"{who}_latency_ms_p90": stats["cpu_latency_p90_ms"],
        f"{who}_latency_repeats": stats["latency_repeats"],
        f"{who}_latency_overhead": stats["latency_overhead"],
        "latency_batch_size": stats["latency_batch_size"],
        "latency_threads": stats["latency_threads"],
    }


def _teacher_cost(teacher: Any, input_shape: tuple[int, ...]) -> tuple[dict[str, Any] | None, int | None]:
    """CPU latency of one sample (model_stats' latency fields: median, p10, p90, ...) and weight bytes,
    measured like the student's: warm-up, then time-bounded repetitions."""
    from kd_core.models.wrap import cpu_latency, latency_fields

    module = teacher.module
    size = None
    if module is not None:
        size = int(sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())))
        if isinstance(getattr(module, "input_shape", None), tuple):
            try:
                from kd_core.models import model_stats

                return model_stats(module, input_shape), size
            except Exception:  # a module that cannot be copied: fall back to timing the teacher itself
                pass
    previous = teacher.device
    teacher.to("cpu")
    x = torch.zeros((1, *input_shape))
    try:
        with torch.no_grad():
            return latency_fields(cpu_latency(teacher.logits, x)), size
    except Exception:
        return None, size
    finally:
        teacher.to(previous)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_result(out_dir: Path, config: ExperimentConfig, result: RunResult) -> Path:
    payload = {
        "metrics": {k: _json_safe(v) for k, v in result.metrics.items()},
        "config": config.to_dict(),
        "stopped": result.stopped,
        "files": {fmt: Path(p).name for fmt, p in result.files.items()},
    }
    path = out_dir / "result.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))
    return path
