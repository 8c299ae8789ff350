"""Teacher-logit cache: a fixed teacher on fixed inputs runs once, then its logits are reused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_core.atomic import atomic_write


def teacher_logits_in_batches(
    logits_fn: Callable[[Tensor], Tensor], x: Tensor, *, batch_size: int = 1024
) -> Tensor:
    """Run a teacher over a whole split in batches, without gradients; float32 on x's device."""
    outputs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out = logits_fn(x[start : start + batch_size])
            outputs.append(torch.as_tensor(out).to(device=x.device, dtype=torch.float32))
    if not outputs:
        return torch.zeros((0, 0), device=x.device)
    return torch.cat(outputs)


class TeacherLogitCache:
    """Logits per (teacher fingerprint, dataset fingerprint, split), kept in memory and on disk.

    On disk each entry is one `.npy` file named by a hash of its key, so a sweep over T and alpha
    in separate processes pays for the teacher once. `directory=None` keeps entries in memory only.
    Entries hold logits of the *unaugmented* inputs; the trainer never uses them for augmented batches.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(teacher_fingerprint: str, dataset_fingerprint: str, split: str, num_samples: int) -> str:
        raw = json.dumps([str(teacher_fingerprint), str(dataset_fingerprint), split, int(num_samples)])
        return hashlib.sha256(raw.encode()).hexdigest()[:40]

    def path_for(self, key: str) -> Path | None:
        return self.directory / f"{key}.npy" if self.directory is not None else None

    def logits(
        self,
        teacher: Any,
        dataset: Any,
        split: str,
        x: Tensor,
        *,
        batch_size: int = 1024,
    ) -> Tensor:
        """The teacher's logits on `x` (the split's raw inputs), computed only on a cache miss."""
        key = self.key(teacher.fingerprint, dataset.fingerprint, split, x.shape[0])
        cached = self._memory.get(key)
        if cached is None:
            cached = self._load(key, x.shape[0], dataset.num_classes)
        if cached is not None:
            self.hits += 1
            cached = cached.to(x.device)
            self._memory[key] = cached
            return cached
        self.misses += 1
        logits = teacher_logits_in_batches(teacher.logits, x, batch_size=batch_size)
        self._memory[key] = logits
        self._save(key, logits)
        return logits

    def _load(self, key: str, num_samples: int, num_classes: int) -> Tensor | None:
        path = self.path_for(key)
        if path is None or not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a torn or foreign file: recompute and overwrite it
        if array.shape != (num_samples, num_classes) or not np.isfinite(array).all():
            return None
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def _save(self, key: str, logits: Tensor) -> None:
        path = self.path_for(key)
        if path is None:
            return
        array = logits.detach().cpu().numpy().astype(np.float32)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a handle: np.save would add ".npy" to a bare path
                np.save(handle, array, allow_pickle=False)

        atomic_write(path, write)
