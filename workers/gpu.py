"""One job per GPU: with KD_GPUS set, a worker runs one pool process per GPU and each sees only its own.

KD_GPUS lists the GPUs this worker may use, as CUDA_VISIBLE_DEVICES names them ("0,1,2,3" or GPU UUIDs).
The worker's concurrency becomes their number (one training job per GPU at a time), and pool process i
sets CUDA_VISIBLE_DEVICES to the i-th of them when it starts, before it imports torch: every job then
runs on "cuda" (device 0 of its process) and never sees the others' memory. Celery gives a process that
replaces a dead one the dead one's index, so it takes over the same GPU. Without KD_GPUS nothing changes.

This module must not import torch: the Celery parent process never touches CUDA before it forks.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery.signals import worker_init, worker_process_init

log = logging.getLogger(__name__)


def gpu_list(value: str | None = None) -> list[str]:
    """The GPUs named by KD_GPUS (or `value`): a comma-separated list; empty when unset."""
    raw = os.environ.get("KD_GPUS", "") if value is None else value
    gpus = [part.strip() for part in raw.split(",") if part.strip()]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"KD_GPUS names a GPU twice: {raw!r}")
    return gpus


def gpu_for_process(index: int, gpus: list[str]) -> str:
    """The GPU of pool process `index` (0-based): one each, in order."""
    return gpus[index % len(gpus)]


def pin(gpu: str) -> None:
    """Make `gpu` the only GPU this process sees (must run before CUDA is initialised in it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.error(
            "CUDA was initialised before this pool process was pinned to GPU %s; it sees every GPU", gpu
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu


@worker_init.connect
def one_process_per_gpu(sender: Any = None, **_: Any) -> None:
    """In the worker's parent: concurrency = the number of KD_GPUS (before the pool starts)."""
    gpus = gpu_list()
    if not gpus or sender is None:
        return
    pool = str(getattr(sender, "pool_cls", ""))
    if "prefork" not in pool and "processes" not in pool:
        if len(gpus) == 1:
            pin(gpus[0])  # a solo/threads worker runs jobs in this very process
            log.info("worker %s: jobs run on GPU %s", sender.hostname, gpus[0])
        else:
            log.warning("KD_GPUS names %d GPUs but pool %s has no processes to give them to", len(gpus), pool)
        return
    if sender.concurrency != len(gpus):
        log.info("worker %s: concurrency %s -> %d, one process per GPU in KD_GPUS", sender.hostname,
                 sender.concurrency, len(gpus))  # fmt: skip
    sender.concurrency = len(gpus)


@worker_process_init.connect
def pin_pool_process(**_: Any) -> None:
    """In each pool process, as it starts: see only its own GPU."""
    gpus = gpu_list()
    if not gpus:
        return
    from celery.utils.log import current_process_index

    index = current_process_index(base=0) or 0
    gpu = gpu_for_process(index, gpus)
    pin(gpu)
    log.info("pool process %d (pid %d) uses GPU %s", index, os.getpid(), gpu)
