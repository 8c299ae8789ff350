"""Teacher-logit cache: a fixed teacher on fixed inputs runs once; its logits live on disk as fp16, memory-mapped."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_core.atomic import atomic_write

# fp16 halves the disk and page cache of a large transfer set; logits need ~3 significant digits
# (a softmax at T >= 1 does not see the rounding), and values beyond fp16's range are clipped.
_FP16_MAX = float(np.finfo(np.float16).max)


def teacher_logits_in_batches(
    logits_fn: Callable[[Tensor], Tensor], x: Tensor, *, batch_size: int = 1024
) -> Tensor:
    """Run a teacher over a whole tensor in batches, without gradients; float32 on x's device."""
    outputs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out = logits_fn(x[start : start + batch_size])
            outputs.append(torch.as_tensor(out).to(device=x.device, dtype=torch.float32))
    if not outputs:
        return torch.zeros((0, 0), device=x.device)
    return torch.cat(outputs)


class CachedLogits:
    """One split's teacher logits, (N, C) fp16 memory-mapped: read by sample index, never loaded whole."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @classmethod
    def open(cls, path: str | Path) -> CachedLogits:
        """An entry's file opened memory-mapped (another process's view of the same cache, e.g. a data-parallel rank)."""
        return cls(np.load(path, mmap_mode="r", allow_pickle=False))

    @property
    def path(self) -> str | None:
        """The file behind this entry (None for an array held in memory)."""
        filename = getattr(self.array, "filename", None)
        return None if filename is None else str(filename)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def take(self, idx: Tensor | np.ndarray, device: torch.device | str) -> Tensor:
        """float32 logits of samples `idx` (in that order) on `device`."""
        idx = idx.cpu().numpy() if isinstance(idx, Tensor) else np.asarray(idx)
        order = np.argsort(idx, kind="stable")  # sorted reads walk the file forwards
        rows = np.empty((len(idx), self.array.shape[1]), dtype=np.float16)
        rows[order] = self.array[idx[order]]
        return torch.from_numpy(rows).to(device).float()

    def tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """All logits as one float32 tensor (small splits only)."""
        return torch.from_numpy(np.array(self.array, dtype=np.float32)).to(device)


class TeacherLogitCache:
    """Logits per (teacher fingerprint, dataset fingerprint, split), as fp16 `.npy` files read memory-mapped.

    Each entry is one file named by a hash of its key, so a sweep over T and alpha in separate processes
    pays for the teacher once. `directory=None` keeps the files in a private temporary directory removed
    by `close()`. Entries hold logits of the *unaugmented* inputs; the loop never uses them for augmented
    batches.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self._temporary = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="kd-logits-")) if directory is None else Path(directory)
        self._entries: dict[str, CachedLogits] = {}
        self.hits = 0
        self.misses = 0

    def close(self) -> None:
        """Forget the entries; a temporary directory is removed."""
        self._entries.clear()
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def key(teacher_fingerprint: str, dataset_fingerprint: str, split: str, num_samples: int) -> str:
        raw = json.dumps([str(teacher_fingerprint), str(dataset_fingerprint), split, int(num_samples)])
        return hashlib.sha256(raw.encode()).hexdigest()[:40]

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def split_logits(
        self,
        teacher: Any,
        dataset: Any,
        split: str,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 1024,
    ) -> CachedLogits:
        """The teacher's logits on a split's raw inputs, computed batch by batch through the loader on a miss."""
        from kd_core.data.loader import eval_batch_size, iterate, split_size

        n = split_size(dataset, split)
        key = self.key(teacher.fingerprint, dataset.fingerprint, split, n)
        found = self._entries.get(key) or self._open(key, n, dataset.num_classes)
        if found is not None:
            self.hits += 1
            self._entries[key] = found
            return found
        self.misses += 1
        num_classes = None

        def write(tmp: str) -> None:
            nonlocal num_classes
            out = None
            rows = eval_batch_size(dataset, batch_size)
            for x, _, idx in iterate(dataset, split, batch_size=rows, device=device):
                if getattr(teacher, "soft_labels", False):  # a file of predictions, by sample (NaN: none)
                    z = teacher.split_logits(dataset, split, idx)
                else:
                    with torch.no_grad():
                        z = torch.as_tensor(teacher.logits(x)).float()
                if out is None:
                    num_classes = int(z.shape[1])
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, num_classes))
                start = int(idx[0])
                out[start : start + len(z)] = z.clamp(-_FP16_MAX, _FP16_MAX).cpu().numpy().astype(np.float16)
            if out is None:
                with open(tmp, "wb") as handle:
                    np.save(handle, np.zeros((0, 0), dtype=np.float16), allow_pickle=False)
            else:
                out.flush()
                del out

        path = self.path_for(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        entry = CachedLogits(np.load(path, mmap_mode="r", allow_pickle=False))
        self._entries[key] = entry
        return entry

    def logits(self, teacher: Any, dataset: Any, split: str, x: Tensor, *, batch_size: int = 1024) -> Tensor:
        """The teacher's logits on `x` (the split's raw inputs) as float32 on x's device (small splits)."""
        key = self.key(teacher.fingerprint, dataset.fingerprint, split, x.shape[0])
        found = self._entries.get(key) or self._open(key, x.shape[0], dataset.num_classes)
        if found is not None:
            self.hits += 1
            self._entries[key] = found
            return found.tensor(x.device)
        self.misses += 1
        logits = teacher_logits_in_batches(teacher.logits, x, batch_size=batch_size)
        array = logits.clamp(-_FP16_MAX, _FP16_MAX).cpu().numpy().astype(np.float16)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a handle: np.save would add ".npy" to a bare path
                np.save(handle, array, allow_pickle=False)

        path = self.path_for(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        entry = CachedLogits(np.load(path, mmap_mode="r", allow_pickle=False))
        self._entries[key] = entry
        return entry.tensor(x.device)

    def _open(self, key: str, num_samples: int, num_classes: int | None) -> CachedLogits | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None  # a torn or foreign file: recompute and overwrite it
        if array.dtype != np.float16 or array.ndim != 2 or array.shape[0] != num_samples:
            return None
        if num_classes is not None and array.shape[1] != num_classes:
            return None
        # A finiteness check reads the file once; done in chunks so a large entry is never loaded whole.
        for start in range(0, num_samples, 65536):
            if not np.isfinite(array[start : start + 65536]).all():
                return None
        return CachedLogits(array)
