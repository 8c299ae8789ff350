"""Batches from a dataset split: resumable order, device-resident or streamed by reader threads, augmented."""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_core.errors import ConfigError, DatasetError

# A split whose float32 form fits under this stays on the device whole (digits- and CIFAR-sized data):
# a batch is then one index into a tensor. Larger splits are read batch by batch from the store.
RESIDENT_MAX_BYTES = int(os.environ.get("KD_RESIDENT_MAX_MB", "1024")) * 1024 * 1024
# Reader threads of a streamed split (read, crop and flip, convert): README "Sizing loader workers".
LOADER_WORKERS = int(os.environ.get("KD_LOADER_WORKERS", "0")) or min(4, os.cpu_count() or 1)
NOISE_SCALE = 0.1  # "noise" augmentation: gaussian noise at this fraction of each feature's std
_READ_CHUNK = 4096  # rows per read when a split is moved to the device whole or summed
# Input bytes (float32) of one evaluation or teacher batch: bounds their activations' memory at any input size.
EVAL_BATCH_BYTES = int(os.environ.get("KD_EVAL_BATCH_MB", "64")) * 1024 * 1024

Augment = Callable[[Tensor, torch.Generator], Tensor]


# --------------------------------------------------------------------------- reading a split


def split_size(dataset: Any, split: str) -> int:
    """Samples in one split (the store's `split_size`, else the length of the in-memory array)."""
    if hasattr(dataset, "split_size"):
        return int(dataset.split_size(split))
    x = getattr(dataset, f"x_{split}", None)
    return 0 if x is None else len(x)


def x_scale(dataset: Any) -> float:
    """Model input = raw * x_scale (1/255 for uint8 images in a store, 1.0 for float data)."""
    return float(getattr(dataset, "x_scale", 1.0))


def has_labels(dataset: Any, split: str) -> bool:
    if getattr(dataset, "labeled", None) is False:
        return False
    return getattr(dataset, f"y_{split}", True) is not None


def read_rows(dataset: Any, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw rows `idx` of a split (in idx order): the store's `read`, else a gather from in-memory arrays."""
    idx = np.asarray(idx, dtype=np.int64)
    if hasattr(dataset, "read"):
        return dataset.read(split, idx)
    x = getattr(dataset, f"x_{split}")
    y = getattr(dataset, f"y_{split}", None)
    # Sorted gathers read a memory-mapped array front to back; the result is put back in idx order.
    order = np.argsort(idx, kind="stable")
    xs = np.asarray(x[idx[order]])
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    ys = None if y is None else np.asarray(y)[idx]
    return xs[back], ys


def eval_batch_size(dataset: Any, cap: int = 1024, budget_bytes: int = EVAL_BATCH_BYTES) -> int:
    """Rows per evaluation/teacher batch: `cap`, fewer for large inputs so a batch's float32 inputs stay
    under `budget_bytes` (1,024 rows at 224 px would be 600 MB of input and GBs of activations)."""
    per_row = 4 * math.prod(tuple(dataset.input_shape))
    return max(1, min(int(cap), budget_bytes // max(1, per_row)))


def nbytes_float32(dataset: Any, split: str) -> int:
    if hasattr(dataset, "nbytes_float32"):
        return int(dataset.nbytes_float32(split))
    return split_size(dataset, split) * 4 * math.prod(tuple(dataset.input_shape))


def sample_inputs(dataset: Any, n: int = 16, splits: tuple[str, ...] = ("test", "val", "train")) -> Tensor:
    """Up to `n` model inputs (float32, scaled) from the first non-empty split: for export checks."""
    for split in splits:
        size = split_size(dataset, split)
        if size:
            x, _ = read_rows(dataset, split, np.arange(min(n, size)))
            return torch.from_numpy(np.asarray(x, dtype=np.float32) * np.float32(x_scale(dataset)))
    return torch.zeros((0, *tuple(dataset.input_shape)))


# --------------------------------------------------------------------------- augmentation (on the device)


def flip_crop_pad(h: int, w: int) -> int:
    """flip_crop's zero padding: 4 px at 32 px and above, less for small images (at least 1)."""
    return max(1, min(4, h // 8, w // 8))


def flip_crop_params(
    b: int, h: int, w: int, generator: torch.Generator
) -> tuple[int, Tensor, Tensor, Tensor]:
    """(pad, row offsets, column offsets, flips) of `b` samples, drawn on the generator's device."""
    pad = flip_crop_pad(h, w)
    dev = generator.device
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=dev)
    flip = torch.rand((b, 1), generator=generator, device=dev) < 0.5
    return pad, oy, ox, flip


def flip_crop(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding (4 px at 32 px, scaled to the image size) and a random h-flip."""
    b, _, h, w = x.shape
    return apply_flip_crop(x, *flip_crop_params(b, h, w, generator))


def to_float_np(x: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """float32 model inputs from raw rows in one pass (numpy: no GIL, no fresh float copy first)."""
    if x.dtype == np.float32 and scale == 1.0:
        return x
    return np.multiply(x, np.float32(scale), out=out, dtype=np.float32, casting="unsafe")


class HostBuffers:
    """A few reusable host arrays for batches, handed out as views and reused once every view is gone.

    Writing a batch into memory the process already has is about twice as fast as into a fresh
    allocation (the page faults of a 150 MB float32 batch at 224 px cost as much as the conversion).
    A buffer is free again when the view handed out (and so every tensor made from it with
    torch.from_numpy) has been released: a batch kept by the caller is never overwritten.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self._bufs: list[list[Any]] = []  # [array, weakref to the view handed out, or None]
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        with self._lock:
            free = [e for e in self._bufs if e[1] is None or e[1]() is None]
            entry = next((e for e in free if e[0].shape == shape and e[0].dtype == dtype), None)
            if entry is None:
                if len(self._bufs) >= self.limit:
                    if not free:  # all in use: an ordinary allocation, not kept
                        return np.empty(shape, dtype)
                    self._bufs.remove(free[0])  # another shape (the short last batch): replaced
                entry = [np.empty(shape, dtype), None]
                self._bufs.append(entry)
            view = entry[0].view()
            entry[1] = weakref.ref(view)
            return view

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


def _to_float(x: Tensor, scale: float) -> Tensor:
    """Raw rows as float32 model inputs (raw * scale), on the tensor's device."""
    if x.device.type == "cpu" and not x.requires_grad and x.dtype in (torch.uint8, torch.float32):
        return torch.from_numpy(to_float_np(x.numpy(), scale))
    x = x.float()
    return x * scale if scale != 1.0 else x


def flip_crop_np(
    x: np.ndarray,
    pad: int,
    oy: np.ndarray,
    ox: np.ndarray,
    flip: np.ndarray,
    scale: float | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """flip_crop of a host batch (N, C, H, W) by slice copies (no padded copy, no index arrays).

    With `scale` the crop is written as float32 raw * scale in the same pass (what the model reads);
    without, in the batch's dtype. Each sample is one strided copy plus its zero borders.
    """
    b, c, h, w = x.shape
    if out is None:
        out = np.empty(x.shape, dtype=np.float32 if scale is not None else x.dtype)
    s32 = np.float32(1.0 if scale is None else scale)
    oy, ox, flip = np.asarray(oy).reshape(-1), np.asarray(ox).reshape(-1), np.asarray(flip).reshape(-1)
    for i in range(b):
        dy, dx = int(oy[i]) - pad, int(ox[i]) - pad
        r0, r1 = max(0, -dy), min(h, h - dy)  # output rows that show image rows (the rest is padding)
        c0, c1 = max(0, -dx), min(w, w - dx)
        dest = out[i][:, :, ::-1] if flip[i] else out[i]  # a flip is a crop written right to left
        src = x[i, :, r0 + dy : r1 + dy, c0 + dx : c1 + dx]
        if scale is None:
            dest[:, r0:r1, c0:c1] = src
        else:
            np.multiply(src, s32, out=dest[:, r0:r1, c0:c1], casting="unsafe")
        if r0:
            dest[:, :r0] = 0
        if r1 < h:
            dest[:, r1:] = 0
        if c0:
            dest[:, :, :c0] = 0
        if c1 < w:
            dest[:, :, c1:] = 0
    return out


def apply_flip_crop(
    x: Tensor, pad: int, oy: Tensor, ox: Tensor, flip: Tensor, scale: float | None = None
) -> Tensor:
    """flip_crop with given offsets and flips; with `scale`, the result is float32 raw * scale.

    On the CPU: slice copies in numpy (`flip_crop_np`); elsewhere one gather per batch.
    """
    b, c, h, w = x.shape
    if x.device.type == "cpu" and not x.requires_grad and x.dtype in (torch.uint8, torch.float32):
        return torch.from_numpy(flip_crop_np(x.numpy(), pad, oy.cpu().numpy(), ox.cpu().numpy(),
                                             flip.cpu().numpy(), scale))  # fmt: skip
    dev = x.device
    oy, ox, flip = oy.to(dev).view(b, 1), ox.to(dev).view(b, 1), flip.to(dev).view(b, 1)
    padded = F.pad(x, (pad, pad, pad, pad))
    cols = torch.arange(w, device=dev).unsqueeze(0)
    cols = ox + torch.where(flip, (w - 1) - cols, cols)
    rows = oy + torch.arange(h, device=dev).unsqueeze(0)
    # One gather per batch: index [B, C, H, W] from per-sample row and column offsets.
    out = padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return out if scale is None else _to_float(out, scale)


def feature_std(dataset: Any, split: str = "train") -> np.ndarray:
    """Per-element std over the samples of a split (unbiased), summed in float64 chunk by chunk."""
    n = split_size(dataset, split)
    shape = tuple(dataset.input_shape)
    total = np.zeros(shape, dtype=np.float64)
    squares = np.zeros(shape, dtype=np.float64)
    scale = x_scale(dataset)
    for start in range(0, n, _READ_CHUNK):
        x, _ = read_rows(dataset, split, np.arange(start, min(n, start + _READ_CHUNK)))
        x = x.astype(np.float64) * scale
        total += x.sum(axis=0)
        squares += (x * x).sum(axis=0)
    mean = total / max(n, 1)
    var = (squares - n * mean * mean) / max(n - 1, 1)
    return np.sqrt(np.clip(var, 0.0, None)).astype(np.float32)


def make_augment(name: str | None, dataset: Any, device: torch.device | str = "cpu") -> Augment | None:
    """An augmentation by name as `f(batch, generator) -> batch` on the device, or None for "none"."""
    if name in (None, "none"):
        return None
    if name == "flip_crop":
        if not getattr(dataset, "is_image", True) or len(tuple(dataset.input_shape)) != 3:
            raise ConfigError("augment 'flip_crop' needs an image dataset; use 'noise' for feature vectors")
        return flip_crop
    if name == "noise":
        scale = NOISE_SCALE * torch.as_tensor(feature_std(dataset), device=device).clamp_min(1e-8)

        def noise(x: Tensor, generator: torch.Generator) -> Tensor:
            return x + scale * torch.randn(x.shape, generator=generator, device=x.device)

        return noise
    raise ConfigError(f"unknown augment {name!r}")


# --------------------------------------------------------------------------- order


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing): order, augmentation, replicas."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


def batches_per_epoch(n: int, batch_size: int, *, train: bool = True, drop_last: bool = False) -> int:
    """Batches in one pass over `n` examples; in training a last batch of a single example is dropped."""
    full, rest = divmod(n, batch_size)
    if drop_last:
        return full
    if not train:
        return full + (1 if rest else 0)
    # Batch norm cannot train on one sample, and one sample adds nothing.
    return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


# --------------------------------------------------------------------------- batches


class Batches:
    """The batches of one split: `get(step)` is a pure function of (seed, step).

    Epoch e is a permutation drawn from (seed, e); batch s is slice s mod steps_per_epoch of it.
    So a run resumed at step s reads exactly what the uninterrupted run read, mid-epoch included,
    and the ranks of a data-parallel group (`part=(rank, world)`) split the same batch.
    """

    def __init__(
        self,
        dataset: Any,
        split: str,
        *,
        batch_size: int,
        seed: int,
        device: torch.device | str,
        shuffle: bool = True,
        augment: str | Augment | None = None,
        indices: np.ndarray | None = None,
        drop_last: bool = False,
        workers: int | None = None,
        prefetch: int = 2,
        part: tuple[int, int] = (0, 1),
        resident_max_bytes: int | None = None,
    ) -> None:
        self.dataset, self.split = dataset, split
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), shuffle
        self.device = torch.device(device)
        n_split = split_size(dataset, split)
        self.indices = (
            np.arange(n_split, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        )
        self.steps_per_epoch = batches_per_epoch(
            len(self.indices), self.batch_size, train=shuffle, drop_last=drop_last
        )
        if self.steps_per_epoch < 1 and shuffle:
            raise DatasetError(f"the {split} split is empty")
        self.augment = (
            make_augment(augment, dataset, self.device)
            if isinstance(augment, str) or augment is None
            else augment
        )
        # flip_crop runs on the raw batch before the float conversion (a quarter of the bytes for
        # uint8), in the reader threads when streamed, its offsets drawn on the CPU for every device.
        self._crop = self.augment is flip_crop
        self.rank, self.world = part
        self.scale = x_scale(dataset)
        self.labeled = has_labels(dataset, split)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        limit = RESIDENT_MAX_BYTES if resident_max_bytes is None else resident_max_bytes
        self.resident = nbytes_float32(dataset, split) <= limit
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self.prefetch = max(0, int(prefetch))
        # The batches in flight: prefetched (or being read) and held by the caller (this step and the last).
        self._buffers = HostBuffers(self.prefetch + 2)
        self._pin = self.device.type == "cuda"
        if self.resident:
            self._x, self._y = self._whole_on_device()
        else:
            # numpy releases the GIL while copying memory-mapped rows, so threads read in parallel.
            n_workers = workers if workers is not None else LOADER_WORKERS
            self._pool = ThreadPoolExecutor(max(1, n_workers), thread_name_prefix=f"kd-loader-{split}")

    # -- order -------------------------------------------------------------------------------

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng(seed_of(self.seed, epoch))
                perm = self.indices[rng.permutation(len(self.indices))]
                self._perms[epoch] = perm
                while len(self._perms) > 2:  # the current epoch and the next (prefetch crosses the boundary)
                    self._perms.popitem(last=False)
            return perm

    def batch_indices(self, step: int) -> np.ndarray:
        """The sample indices (within the split) of the whole batch at `step`, all ranks together."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        order = self._perm(epoch) if self.shuffle else self.indices
        return order[pos * self.batch_size : (pos + 1) * self.batch_size]

    def part_indices(self, step: int) -> np.ndarray:
        """This rank's share of the batch at `step`."""
        full = self.batch_indices(step)
        return np.array_split(full, self.world)[self.rank] if self.world > 1 else full

    # -- data --------------------------------------------------------------------------------

    def _whole_on_device(self) -> tuple[Tensor, Tensor | None]:
        n = split_size(self.dataset, self.split)
        x_attr = getattr(self.dataset, f"x_{self.split}", None)
        if not hasattr(self.dataset, "read") and x_attr is not None:
            x = torch.as_tensor(np.asarray(x_attr)).to(self.device)
            y_attr = getattr(self.dataset, f"y_{self.split}", None)
            y = (
                None
                if y_attr is None
                else torch.as_tensor(np.asarray(y_attr), dtype=torch.long).to(self.device)
            )
            return x, y
        # A store: chunk by chunk in the raw dtype (uint8 stays uint8 on the device, a quarter of float32).
        xs, ys = [], []
        for start in range(0, n, _READ_CHUNK):
            x, y = read_rows(self.dataset, self.split, np.arange(start, min(n, start + _READ_CHUNK)))
            xs.append(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
            if y is not None:
                ys.append(torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device))
        shape = (0, *tuple(self.dataset.input_shape))
        x = torch.cat(xs) if xs else torch.zeros(shape, device=self.device)
        y = torch.cat(ys) if ys and self.labeled else None
        return x, y

    def _crop_params(self, step: int, b: int, h: int, w: int) -> tuple[int, Tensor, Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed_of(self.seed, step, self.rank, 1))
        return flip_crop_params(b, h, w, generator)

    def _read(self, idx: np.ndarray, step: int) -> tuple[Tensor, Tensor | None]:
        """Batch `step` on the host, in a reader thread: read, crop and flip, and (for the CPU) to float32.

        For a GPU the batch stays raw (uint8 crosses the bus at a quarter of float32's bytes) and is
        converted there.
        """
        x, y = read_rows(self.dataset, self.split, idx)
        x = np.ascontiguousarray(x)
        scale = self.scale if self.device.type == "cpu" else None
        if self._crop and len(x):
            pad, oy, ox, flip = self._crop_params(step, *(x.shape[0], *x.shape[2:]))
            out = self._buffers.take(x.shape, np.float32 if scale is not None else x.dtype)
            x = flip_crop_np(x, pad, oy.numpy(), ox.numpy(), flip.numpy(), scale, out)
        elif scale is not None and not (x.dtype == np.float32 and scale == 1.0):
            x = to_float_np(x, scale, self._buffers.take(x.shape, np.float32))
        xt = torch.from_numpy(x)
        yt = None if y is None or not self.labeled else torch.from_numpy(np.asarray(y, dtype=np.int64))
        if self._pin:  # page-locked, so the copy to the GPU runs asynchronously
            xt = xt.pin_memory()
            yt = yt.pin_memory() if yt is not None else None
        return xt, yt

    def _submit(self, step: int) -> None:
        if self._pool is not None and step not in self._pending and step < self._horizon:
            self._pending[step] = self._pool.submit(self._read, self.part_indices(step), step)

    def _to_input(self, x: Tensor) -> Tensor:
        return x if x.dtype == torch.float32 and self.scale == 1.0 else _to_float(x, self.scale)

    def get(self, step: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """(x float32 on the device, y int64 or None, sample indices int64) of batch `step`."""
        idx_np = self.part_indices(step)
        idx = torch.from_numpy(idx_np.copy()).to(self.device, non_blocking=True)
        if self.resident:
            assert self._x is not None
            raw = self._x[idx]
            if self._crop and len(idx_np):
                x = apply_flip_crop(raw, *self._crop_params(step, len(raw), *raw.shape[2:]), self.scale)
            else:
                x = self._to_input(raw)
            y = self._y[idx] if self._y is not None else None
        else:
            future = self._pending.pop(step, None)
            x_host, y_host = future.result() if future is not None else self._read(idx_np, step)
            for old in [s for s in self._pending if s < step]:  # a jump (resume): drop stale reads
                self._pending.pop(old).cancel()
            for ahead in range(step + 1, step + 1 + self.prefetch):
                self._submit(ahead)
            # On the CPU the reader thread has already made the float32 inputs.
            x = (
                x_host
                if self.device.type == "cpu"
                else self._to_input(x_host.to(self.device, non_blocking=True))
            )
            y = y_host.to(self.device, non_blocking=True) if y_host is not None else None
        if self.augment is not None and not self._crop and len(idx_np):
            generator = torch.Generator(device=self.device).manual_seed(
                seed_of(self.seed, step, self.rank, 1)
            )
            x = self.augment(x, generator)
        return x, y, idx

    _horizon = math.inf  # steps past this are never prefetched (the end of an `iterate` pass)

    def each(self) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
        """One pass in order (with shuffle=False: every sample once), for evaluation."""
        self._horizon = self.steps_per_epoch
        for step in range(self.steps_per_epoch):
            yield self.get(step)

    def close(self) -> None:
        """Stop the reader threads (pending reads are dropped)."""
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._buffers.clear()

    def __del__(self) -> None:  # a forgotten close must not leave threads behind
        try:
            self.close()
        except Exception:
            pass


def make_batches(
    dataset: Any,
    split: str,
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    shuffle: bool = True,
    augment: str | Augment | None = None,
    indices: np.ndarray | None = None,
    drop_last: bool = False,
    workers: int | None = None,
    prefetch: int = 2,
    part: tuple[int, int] = (0, 1),
    resident_max_bytes: int | None = None,
) -> Batches:
    """The batches of `split` for training (see `Batches`); `resident_max_bytes` overrides RESIDENT_MAX_BYTES."""
    return Batches(
        dataset, split, batch_size=batch_size, seed=seed, device=device, shuffle=shuffle, augment=augment,
        indices=indices, drop_last=drop_last, workers=workers, prefetch=prefetch, part=part,
        resident_max_bytes=resident_max_bytes,
    )  # fmt: skip


def iterate(
    dataset: Any,
    split: str,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    resident_max_bytes: int | None = None,
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """Every sample of `split` once, in order, as (x, y, idx) batches: evaluation and teacher logits."""
    if split_size(dataset, split) == 0:
        return
    batches = Batches(
        dataset, split, batch_size=batch_size, seed=0, device=device, shuffle=False,
        resident_max_bytes=resident_max_bytes,
    )  # fmt: skip
    try:
        yield from batches.each()
    finally:
        batches.close()
