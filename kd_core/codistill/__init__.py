"""Codistillation (Anil et al. 2018): N replicas train together, each also learning from the others' predictions.

Modules (imports run down this list only, never back up): `common` (seeds, shards, schedules, the
replica loss, metrics, exports), `exchange` (how groups swap stale copies), `in_process` (every
replica in one loop), `group_loop` (one data-parallel group's step, its collectives and checkpoint),
`data_parallel` (`devices: N` for train/distill: the train/distill step on a group's ranks), `combine`
(the experiment's result from every group's replica), `launcher` (worker subprocesses, one group per
task, one train/distill job over N devices, the worker entry point). Every placement trains through
the shared loop in `kd_core.loop`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd_core.codistill.combine import combine_group_results
from kd_core.codistill.common import (
    KeepBest,
    check_trainable,
    copy_step_at,
    eval_period,
    make_model,
    peer_logits_for,
    replica_batches,
    replica_loss,
    replica_seed,
    replica_train_indices,
    shard_indices,
)
from kd_core.codistill.exchange import FileExchange, GroupExchange, MemoryExchange
from kd_core.codistill.in_process import CHECKPOINT_EVERY_S, run_in_process
from kd_core.codistill.launcher import (
    group_status,
    load_saved_dataset,
    run_codistill_group,
    run_data_parallel,
    run_groups_in_subprocesses,
    save_dataset,
)
from kd_core.config import ExperimentConfig
from kd_core.result import RunResult
from kd_core.sinks import MetricsSink

__all__ = [
    "FileExchange",
    "GroupExchange",
    "KeepBest",
    "MemoryExchange",
    "combine_group_results",
    "copy_step_at",
    "eval_period",
    "group_status",
    "load_saved_dataset",
    "make_model",
    "peer_logits_for",
    "replica_batches",
    "replica_loss",
    "replica_seed",
    "replica_train_indices",
    "run_codistill",
    "run_codistill_group",
    "run_data_parallel",
    "save_dataset",
    "shard_indices",
]


def run_codistill(
    config: ExperimentConfig,
    dataset: Any,
    *,
    out_dir: str | Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,
    export: bool = True,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> RunResult:
    """Train `config.codistill.replicas` replicas together and export them; returns a RunResult.

    With `group_size == 1` all replicas share this process and device and step in one loop;
    with `group_size > 1` each replica is a group of data-parallel subprocesses (see `launcher`).
    Files: the best replica as student.*, every replica as replica{k}.*. This call starts every
    group itself whatever `codistill.placement` says: placement "workers" is read by the Celery
    side, which calls `run_codistill_group` once per group. `export=False` skips the exports.
    """
    check_trainable(config, dataset)
    if config.codistill.group_size > 1:
        return run_groups_in_subprocesses(
            config, dataset, out_dir=out_dir, sink=sink, should_stop=should_stop, device=device,
            checkpoint_path=checkpoint_path, checkpoint_every_s=checkpoint_every_s,
        )  # fmt: skip
    return run_in_process(
        config, dataset, Path(out_dir), sink, should_stop, torch.device(device), checkpoint_path, export,
        checkpoint_every_s,
    )  # fmt: skip
