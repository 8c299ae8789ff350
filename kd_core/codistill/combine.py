"""The experiment's result from every codistillation group's exported replica: best one, ensemble, churn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from kd_core.codistill.common import (
    final_metrics,
    make_model,
    measure_replicas,
    student_files,
    val_values,
)
from kd_core.config import ExperimentConfig
from kd_core.errors import CheckpointError, TrainingError
from kd_core.models import count_params
from kd_core.result import RunResult
from kd_core.sinks import MetricsSink


def load_replica(
    config: ExperimentConfig, dataset: Any, path: str, group: int, device: torch.device
) -> nn.Module:
    """Group `group`'s exported weights in its replica's model (eval mode)."""
    model = make_model(config, dataset, group, device)
    try:
        model.load_state_dict(load_file(path, device=str(device)))
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"replica {group}'s exported weights do not load: {exc}") from exc
    return model.eval()


def combine_group_results(
    config: ExperimentConfig,
    dataset: Any,
    group_files: Sequence[Mapping[str, str] | None],
    *,
    out_dir: str | Path,
    sink: MetricsSink | None = None,
    device: torch.device | str = "cpu",
    step: int | None = None,
) -> RunResult:
    """The experiment's RunResult from each group's exported replica (None for a group that failed).

    With a `sink`, logs the final ensemble/churn/best-replica series at `step` (the last step
    trained; default config.max_steps or 0).

    `group_files[g]` is group g's RunResult.files ({"safetensors", "torchscript", "onnx"}). The
    best replica (validation accuracy) becomes student.*; metrics as run_codistill's: val_acc,
    test_acc, student_params of the best replica, ensemble_val_acc/ensemble_test_acc over the
    surviving replicas, churn, replica{g}_val_acc/_test_acc, best_replica.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    alive = [g for g, f in enumerate(group_files) if f and f.get("safetensors")]
    if not alive:
        raise TrainingError("no codistillation group left a trained replica")
    models = [load_replica(config, dataset, group_files[g]["safetensors"], g, device) for g in alive]
    val, test, best = measure_replicas(models, dataset, device)
    per_files: list[dict[str, str] | None] = [None] * len(group_files)
    for g in alive:
        per_files[g] = dict(group_files[g])
    files = student_files(per_files, alive[best], out_dir)
    metrics = final_metrics(val, test, best, count_params(models[best]), 0, alive=alive)
    metrics.pop("steps")
    if sink is not None:
        sink.log(int(step if step is not None else config.max_steps or 0), val_values(val, best, names=alive))
    return RunResult(metrics=metrics, files=files, stopped=False, model=models[best])
