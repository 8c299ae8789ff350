"""The on-disk dataset store: an NPZ/CSV/ZIP file or a folder of class subfolders ingested once, read by rows.

A store is a directory:
  meta.json    version, name, format (npz|csv|zip|folder), kind (image|table), input_shape, x_dtype,
               x_scale, num_samples, class_names, num_classes, labeled, has_splits, given_splits,
               fingerprint, info
  x.npy        (N, *input_shape): uint8 pixels 0..255 (ZIP, folder, uint8 NPZ) or float32
  y.npy        (N,) int64, -1 where unlabeled
  split.npy    (N,) int8: -1 carve later (seeded, stratified), 0 train, 1 val, 2 test (given by the file)
  sources.txt  one line per sample: "line L" of a CSV, "x[i]" / "x_val[i]" of an NPZ, a ZIP member
               path, or the relative path of an imported file; line i is sample i, stable for life

Why this format: raw uint8 pixels in one x.npy, read with pread. Measured by bench/bench_scale.py on the
2-core development machine: random batches of 256, one thread, page cache warm, images/s per core:

                               224x224x3    32x32x3
  this store (x.npy, pread)       38,000    524,000
  same file, numpy memmap         54,000  4,000,000
  Arrow fixed-size binary take    29,000  1,500,000
  JPEG bytes + Pillow decode       1,500     10,700   (27.7 KB and 1.3 KB a noisy image at quality 90)

- Keeping compressed JPEG bytes would cut disk ~5x at 224 px but costs ~25x the CPU per image: 2,000
  images/s would need more than one core doing nothing but decoding, while raw reads are a memcpy that
  scales with cores and disk. Disk is the cheaper resource (30,000 images at 224 px are 4.5 GB raw).
- pread instead of the memory map: a memory-mapped read counts every page touched as the reader's RSS
  (reading a 4.5 GB store once would show 4.5 GB resident); pread copies only the rows asked for,
  releases the GIL (loader threads run in parallel) and is still >10x what any model here consumes.
  open_store() still offers the memory map for small reads and tools.
- Arrow (pyarrow; Hugging Face datasets sits on it): the same memcpy-bound reads, slower than pread at
  224 px, for a large dependency.
- WebDataset, LitData and Mosaic MDS are sharded formats for sequential streaming from object storage:
  random access is per shard or through a shuffle buffer, so an exactly seeded sample order that resumes
  mid-epoch (issue 8) needs their own state machinery; their samples are the same raw or JPEG bytes, so
  per-sample cost is one of the lines above. FFCV needs a compiled extension last released in 2023.
  None earns a dependency here.
Ingest (same bench): a ZIP of 30,000 JPEGs at 224x224 across 10 classes, 1,305 images/s on 2 cores
(decoding in threads), peak RSS of the ingesting process 86 MiB; the store is 4.5 GB.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import stat
import struct
import tempfile
import time
import uuid
import zipfile
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd_core.data import images, tables
from kd_core.data.dataset import (
    SPLITS,
    Dataset,
    RowFile,
    SplitView,
    carve_splits,
    check_finite,
    check_labels,
    check_split,
    check_x_layout,
    resolve_classes,
    split_stats,
)
from kd_core.data.options import check_options, image_size_option
from kd_core.errors import DatasetError

STORE_VERSION = 1
# At most about this much of x is in memory at once while a file is ingested (and its copies).
CHUNK_BYTES = 8 * 1024**2
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# Reserved for the x.npy header: rewritten with the true row count when the file is complete.
_HEADER_BYTES = 256
_MAGIC = b"\x93NUMPY\x01\x00"
_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
FILE_FORMATS = ("npz", "csv", "zip")

Progress = Callable[[float], None]
ShouldStop = Callable[[], bool]


class IngestStopped(DatasetError):
    """should_stop() said to stop: the ingest was abandoned and nothing was left behind."""


# ---------------------------------------------------------------- read side


@dataclass
class Store:
    """An opened store: meta, and x (memory-mapped), y and split (small: loaded)."""

    path: Path
    meta: dict[str, Any]
    x: np.ndarray
    y: np.ndarray
    split: np.ndarray

    def sources(self) -> Iterator[str]:
        with open(self.path / "sources.txt", encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")


def is_store(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "meta.json").is_file() and (p / "x.npy").is_file()


def open_store(path: str | Path) -> Store:
    """The store at `path`, x memory-mapped read-only; DatasetError when it is not a complete store."""
    p = Path(path)
    if not is_store(p):
        raise DatasetError(f"{p.name!r} is not a dataset store (no meta.json and x.npy)")
    try:
        meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != STORE_VERSION:
            raise DatasetError(
                f"the dataset store has version {meta.get('version')!r}; expected {STORE_VERSION}"
            )
        x = np.load(p / "x.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(p / "y.npy", allow_pickle=False)
        split = np.load(p / "split.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the dataset store: {exc}") from exc
    if len(x) != meta["num_samples"] or len(y) != len(x) or len(split) != len(x):
        raise DatasetError("the dataset store is damaged: its arrays disagree in length")
    return Store(p, meta, x, y, split)


def store_dataset(
    store: Store,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    stats: bool = True,
) -> Dataset:
    """The Dataset over a store: given splits kept, the rest carved by the seeded stratified split.

    Nothing is copied: each split is a SplitView of the memory-mapped x. `stats=False` skips the
    training split's mean/std (inspection does not show them).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 0.9):
        raise DatasetError(
            "val_fraction and test_fraction must be in [0, 1) and leave room for training data"
        )
    meta = store.meta
    labeled = bool(meta["labeled"])
    y = store.y if labeled else None
    given = list(meta.get("given_splits", []))
    codes = np.asarray(store.split)
    pool = np.flatnonzero((codes != SPLIT_CODES["val"]) & (codes != SPLIT_CODES["test"]))
    fractions = {"val": val_fraction, "test": test_fraction}
    missing = {s: fractions[s] for s in ("val", "test") if s not in given}
    parts = carve_splits(None if y is None else y[pool], len(pool), missing, np.random.default_rng(seed))
    index = {s: pool[idx] for s, idx in parts.items()}
    for s in given:
        index[s] = np.flatnonzero(codes == SPLIT_CODES[s])
    scale = float(meta["x_scale"])
    rows = RowFile(store.path / "x.npy")
    views = {s: SplitView(rows, index[s], scale) for s in SPLITS}
    preprocessing: dict[str, Any] = {}
    if stats:
        preprocessing = _cached_stats(store, views["train"])
    h = hashlib.sha256(b"kd-studio-store-split-v1\0" + meta["fingerprint"].encode())
    for s in SPLITS:
        h.update(f"\0{s}:{len(index[s])}".encode())
        h.update(np.ascontiguousarray(index[s], dtype="<i8").data)
    input_shape = tuple(int(d) for d in meta["input_shape"])
    return Dataset(
        name=meta["name"],
        format=meta["format"],
        x_train=views["train"],  # type: ignore[arg-type]  # SplitView: indexable like an array
        y_train=None if y is None else y[index["train"]],
        x_val=views["val"],  # type: ignore[arg-type]
        y_val=None if y is None else y[index["val"]],
        x_test=views["test"],  # type: ignore[arg-type]
        y_test=None if y is None else y[index["test"]],
        class_names=list(meta["class_names"]),
        num_classes=meta["num_classes"],
        input_shape=input_shape,
        is_image=meta["kind"] == "image" and len(input_shape) == 3,
        preprocessing=preprocessing,
        fingerprint=h.hexdigest(),
        info=dict(meta.get("info", {})),
        x_scale=scale,
        store_path=str(store.path),
    )


def _cached_stats(store: Store, train: SplitView) -> dict[str, Any]:
    """The training split's mean/std, computed once per split and kept beside the store when writable."""
    key = hashlib.sha256(np.ascontiguousarray(np.sort(train.index), dtype="<i8").data).hexdigest()[:24]
    path = store.path / f"stats-{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(path.read_text())
        return {"mean": cached["mean"], "std": cached["std"]}
    mean, std = split_stats(train)
    out = {"mean": mean.tolist(), "std": std.tolist()}
    with contextlib.suppress(OSError):  # a read-only store: computed again next time
        from kd_core.atomic import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(out)))
    return out


# ---------------------------------------------------------------- write side


def ingest(
    source: str | Path,
    dest: str | Path,
    *,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> dict[str, Any]:
    """Read an NPZ/CSV/ZIP file or a folder of class subfolders into a new store at `dest`, atomically.

    The store is written into a hidden sibling directory renamed to `dest` at the end: on any error,
    stop or kill there is no partial store at `dest` (a killed ingest's leftovers are removed by the
    next ingest to the same `dest`). Memory stays bounded (chunks of CHUNK_BYTES; labels at 8 bytes
    a sample). Returns inspect_dataset's summary of the new store.
    """
    from kd_core.data.inspect import describe_dataset

    opts = check_options(options)
    src, dest = Path(source), Path(dest)
    fmt = _format_of(src, opts)
    if dest.exists():
        raise DatasetError(f"a dataset store already exists at {dest.name!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dest)
    staging = dest.parent / _staging_name(dest)
    staging.mkdir()
    writer: _Writer | None = None
    try:
        writer = _Writer(staging, progress, should_stop)
        meta = _READERS[fmt](src, opts, writer)
        meta["name"] = src.stem if src.is_file() else src.name
        writer.finish(meta)
        # Summarised before the rename: a store that cannot be split (too few samples) is never published.
        summary = describe_dataset(store_dataset(open_store(staging), stats=False))
        os.rename(staging, dest)
    except BaseException as exc:
        if writer is not None:
            writer.close_files()
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            raise DatasetError(
                "the disk is full (or the storage quota reached) while writing the dataset; nothing was kept"
            ) from exc
        if isinstance(exc, MemoryError):
            raise DatasetError("the dataset does not fit in memory while ingesting") from exc
        if isinstance(exc, OSError) and not isinstance(exc, DatasetError):
            raise DatasetError(f"cannot ingest the dataset: {exc.strerror or exc}") from exc
        raise
    if progress is not None:
        progress(1.0)
    return summary


def _format_of(src: Path, opts: dict[str, Any]) -> str:
    if src.is_dir():
        return "folder"
    fmt = opts.get("format") or src.suffix.lower().lstrip(".")
    if fmt not in FILE_FORMATS:
        raise DatasetError(
            f"unsupported dataset file type {src.suffix or fmt!r}: use a .npz, .csv or .zip file"
        )
    if not src.is_file():
        raise DatasetError(f"dataset file not found: {src.name}")
    if not os.access(src, os.R_OK):
        raise DatasetError(f"the dataset file {src.name!r} cannot be read (permission denied)")
    return fmt


def _staging_name(dest: Path) -> str:
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    return f".{dest.name}.ingest-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# A staging directory untouched this long belongs to a dead ingest, whichever machine ran it.
STALE_STAGING_S = 24 * 3600


def _remove_stale_staging(dest: Path) -> None:
    """Remove staging directories of ingests to `dest` that died: on this machine with a gone pid, or old."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    for old in dest.parent.glob(f".{dest.name}.ingest-*"):
        owner, _, rest = old.name.rsplit(".ingest-", 1)[1].rpartition("-")[0].rpartition("-")
        try:
            pid = int(rest)
            age = time.time() - old.stat().st_mtime
        except (ValueError, OSError):
            continue
        if (owner == host and pid != os.getpid() and not _alive(pid)) or age > STALE_STAGING_S:
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header of exactly _HEADER_BYTES bytes (padded with spaces, as numpy does)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    body = text.encode("latin1")
    pad = _HEADER_BYTES - len(_MAGIC) - 2 - len(body) - 1
    if pad < 0:
        raise DatasetError(f"samples of shape {shape[1:]} have too many dimensions")
    return _MAGIC + struct.pack("<H", _HEADER_BYTES - len(_MAGIC) - 2) + body + b" " * pad + b"\n"


class _GrowingNpy:
    """A .npy file written row block by row block, its row count fixed in the header at close."""

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self.f = open(path, "wb")  # noqa: SIM115  # closed by close()
        self.f.write(_npy_header(self.dtype, (0, *self.row_shape)))

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        self.f.write(block.data)
        self.rows += len(block)

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
        self.f.close()


class _Writer:
    """What every reader writes through: x rows, labels, split codes, sources, progress and stop checks."""

    def __init__(self, staging: Path, progress: Progress | None, should_stop: ShouldStop | None) -> None:
        self.dir = staging
        self.progress_cb, self.should_stop = progress, should_stop
        self.x: _GrowingNpy | None = None
        self.y = array("q")
        self.codes = array("b")
        self.sources = open(staging / "sources.txt", "w", encoding="utf-8", newline="\n")  # noqa: SIM115

    def start_x(self, dtype: Any, row_shape: tuple[int, ...], estimate_bytes: int) -> None:
        free = shutil.disk_usage(self.dir).free
        if estimate_bytes > free:
            raise DatasetError(
                f"the dataset needs about {estimate_bytes // 1024**2:,} MiB of disk but only "
                f"{free // 1024**2:,} MiB are free"
            )
        self.x = _GrowingNpy(self.dir / "x.npy", dtype, row_shape)

    def rows(self, x: np.ndarray, y: np.ndarray | None, code: int, sources: list[str]) -> None:
        assert self.x is not None
        self.x.append(x)
        labels = np.full(len(x), -1, np.int64) if y is None else np.asarray(y, dtype=np.int64)
        self.y.frombytes(labels.tobytes())
        self.codes.frombytes(np.full(len(x), code, np.int8).tobytes())
        self.sources.write("".join(s.replace("\n", " ") + "\n" for s in sources))

    def tick(self, fraction: float) -> None:
        """Between chunks: stop when asked, report progress (writing meta and hashing is the last 5%)."""
        if self.should_stop is not None and self.should_stop():
            raise IngestStopped("the ingest was stopped")
        if self.progress_cb is not None:
            self.progress_cb(min(max(fraction, 0.0), 1.0) * 0.95)

    def finish(self, meta: dict[str, Any]) -> None:
        assert self.x is not None
        self.x.close()
        self.sources.close()
        y = np.frombuffer(self.y, dtype=np.int64) if len(self.y) else np.zeros(0, np.int64)
        codes = np.frombuffer(self.codes, dtype=np.int8) if len(self.codes) else np.zeros(0, np.int8)
        np.save(self.dir / "y.npy", y)
        np.save(self.dir / "split.npy", codes)
        x = RowFile(self.dir / "x.npy")
        meta.update(
            version=STORE_VERSION,
            input_shape=list(x.shape[1:]),
            x_dtype=str(x.dtype),
            num_samples=int(len(x)),
            has_splits=bool(meta.get("given_splits")),
        )
        meta["fingerprint"] = self._fingerprint(meta, x, y, codes)
        x.close()
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")

    def _fingerprint(self, meta: dict[str, Any], x: RowFile, y: np.ndarray, codes: np.ndarray) -> str:
        """sha256 of what the store holds, read back from disk in chunks: equal fingerprints, equal data."""
        h = hashlib.sha256(b"kd-studio-store-v1\0")
        keys = ("format", "kind", "class_names", "x_scale", "given_splits", "fingerprint_options")
        h.update(json.dumps({k: meta.get(k) for k in keys}, sort_keys=True, default=str).encode())
        h.update(f"\0x:{x.dtype.str}:{x.shape}".encode())
        step = max(1, CHUNK_BYTES // max(1, x.row_bytes))
        for start in range(0, len(x), step):
            h.update(x.read_range(start, start + step).data)
            self.tick(0.95 + 0.05 * start / max(1, len(x)))
        h.update(b"\0y:" + np.ascontiguousarray(y, "<i8").tobytes())
        h.update(b"\0split:" + codes.tobytes())
        return h.hexdigest()

    def close_files(self) -> None:
        if self.x is not None and not self.x.f.closed:
            self.x.f.close()
        if not self.sources.closed:
            self.sources.close()


# ---------------------------------------------------------------- NPZ


def _ingest_npz(path: Path, opts: dict[str, Any], w: _Writer) -> dict[str, Any]:
    """x, y and optional x_val/y_val, x_test/y_test, class_names; x streamed member by member in chunks."""
    headers = tables.check_npz_headers(path)
    known = {k: h for k, h in headers.items() if k in tables.NPZ_KEYS}
    ignored = sorted(k for k in headers if k not in tables.NPZ_KEYS)
    info = tables.npz_info({k: h[0] for k, h in known.items()}, ignored)
    small: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in ("y", "y_val", "y_test", "class_names"):
                if key in known:
                    small[key] = npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read the NPZ file: {exc}") from exc
    class_names = tables.npz_class_names(small)

    # build_dataset's checks, in its order, from the headers and the labels.
    x_shape, _, x_dtype = known["x"]
    check_x_layout(x_shape, x_dtype, "x")
    labeled = "y" in small
    y = check_labels(small["y"], "y", x_shape[0]) if labeled else None
    parts: list[tuple[str, int, np.ndarray | None]] = [("x", -1, y)]
    given: list[str] = []
    for split in ("val", "test"):
        xk, yk = f"x_{split}", f"y_{split}"
        if xk not in known:
            if yk in small:
                raise DatasetError(f"'{yk}' is given without '{xk}'")
            continue
        shape, _, dtype = known[xk]
        check_x_layout(shape, dtype, xk, allow_empty=True)
        ys = check_split(split, shape, x_shape, small.get(yk), labeled)
        parts.append((xk, SPLIT_CODES[split], ys))
        given.append(split)
    labels = [p[2] for p in parts if p[2] is not None] if labeled else None
    names, num_classes = resolve_classes(class_names, labels)
    if len(given) == 2:
        parts[0] = ("x", SPLIT_CODES["train"], y)

    # uint8 stays uint8 (as stored: x_scale 1, so models see the same values as before); all else float32.
    store_dtype = np.uint8 if all(known[p[0]][2] == np.uint8 for p in parts) else np.float32
    total_rows = sum(known[p[0]][0][0] for p in parts)
    row_elems = math.prod(x_shape[1:])
    w.start_x(store_dtype, x_shape[1:], total_rows * row_elems * np.dtype(store_dtype).itemsize)
    done = 0
    with zipfile.ZipFile(path) as zf:
        for key, code, ys in parts:
            for start, block in _npz_rows(zf, path, key, known[key], w):
                if store_dtype == np.float32:
                    with np.errstate(over="ignore"):  # beyond float32: refused as infinite just below
                        block = block.astype(np.float32)
                    check_finite(block, key, offset=start)
                stop = start + len(block)
                w.rows(
                    block,
                    None if ys is None else ys[start:stop],
                    code,
                    [f"{key}[{i}]" for i in range(start, stop)],
                )
                done += len(block)
                w.tick(done / max(1, total_rows))
    return {
        "format": "npz",
        "kind": "image" if len(x_shape) == 4 else "table",
        "x_scale": 1.0,
        "class_names": names,
        "num_classes": num_classes,
        "labeled": labeled,
        "given_splits": given,
        "fingerprint_options": {},
        "info": info,
    }


def _npz_rows(
    zf: zipfile.ZipFile, path: Path, key: str, header: tuple[tuple[int, ...], bool, np.dtype], w: _Writer
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of one .npy member, CHUNK_BYTES at a time, stored or deflated alike."""
    shape, fortran, dtype = header
    n = shape[0]
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    step = max(1, CHUNK_BYTES // max(1, row_bytes, 4 * math.prod(shape[1:])))
    try:
        if fortran and len(shape) > 1:
            # Column-major rows are not contiguous: unpack the member to a scratch file and map it.
            scratch = w.dir / f"scratch-{key}.npy"
            with zf.open(f"{key}.npy") as src, open(scratch, "wb") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)
            arr = np.load(scratch, mmap_mode="r", allow_pickle=False)
            for start in range(0, n, step):
                yield start, np.ascontiguousarray(arr[start : start + step])
            del arr
            scratch.unlink()
            return
        with zf.open(f"{key}.npy") as f:
            tables.read_npy_header(f, key)
            for start in range(0, n, step):
                rows = min(step, n - start)
                data = f.read(rows * row_bytes)
                if len(data) != rows * row_bytes:
                    raise DatasetError(f"cannot read the NPZ file: array '{key}' is truncated")
                yield start, np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            raise
        raise DatasetError(f"cannot read the NPZ file: {exc}") from exc


# ---------------------------------------------------------------- CSV


def _ingest_csv(path: Path, opts: dict[str, Any], w: _Writer) -> dict[str, Any]:
    """Numeric feature columns plus an optional label column (integers or class-name strings), in chunks."""
    size = max(1, path.stat().st_size)
    with tables.open_csv(path, opts) as (header, label_idx, feat_idx, rows, position):
        width = len(feat_idx)
        labels = tables.CsvLabels(header[label_idx]) if label_idx is not None else None
        lines = array("q")
        batch = array("d")
        first_bad: tuple[int, int, float, int] | None = None
        first_over: int | None = None
        n = 0
        # A rough bound (4 bytes a field, at least 2 characters a field): refuse early if it cannot fit.
        w.start_x(np.float32, (width,), min(size * 2, size // max(1, 2 * (width + 1)) * width * 4))

        def spill() -> None:
            nonlocal first_bad, first_over
            block = np.array(batch, dtype=np.float64).reshape(-1, width)  # a copy: batch is reused
            start = n - len(block)
            bad = ~np.isfinite(block)
            if first_bad is None and bad.any():
                r, c = (int(v) for v in np.argwhere(bad)[0])
                first_bad = (start + r, c, float(block[r, c]), lines[start + r])
            with np.errstate(over="ignore"):  # beyond float32: refused as infinite, after the labels
                x32 = block.astype(np.float32)
            if first_over is None and not np.isfinite(x32).all():
                first_over = start + int(np.flatnonzero(~np.isfinite(x32).all(axis=1))[0])
            w.rows(x32, None, -1, [f"line {lines[i]}" for i in range(start, n)])
            del batch[:]
            w.tick(position() / size)

        for line, row_values, label in rows:
            batch.extend(row_values)
            if labels is not None:
                labels.add(label)
            lines.append(line)
            n += 1
            if len(batch) * 8 >= CHUNK_BYTES:
                spill()
        if batch:
            spill()
        if not n:
            raise DatasetError("the CSV file has a header but no data rows")
        if first_bad is not None:
            row, c, value, line = first_bad
            raise DatasetError(tables.csv_nonfinite_message(header[feat_idx[c]], value, row, line))
        y, class_names = tables.csv_labels(labels, lines) if labels is not None else (None, None)
        if first_over is not None:
            raise DatasetError(f"'x' contains NaN or infinite values (first in sample {first_over})")
    labeled = y is not None
    names, num_classes = resolve_classes(class_names, [y] if labeled else None)
    if labeled:
        w.y = array("q", y.tobytes())
    return {
        "format": "csv",
        "kind": "table",
        "x_scale": 1.0,
        "class_names": names,
        "num_classes": num_classes,
        "labeled": labeled,
        "given_splits": [],
        "fingerprint_options": tables.csv_fingerprint_options(header, label_idx),
        "info": tables.csv_info(header, label_idx, feat_idx),
    }


# ---------------------------------------------------------------- images: ZIP and folder


def _ingest_zip(path: Path, opts: dict[str, Any], w: _Writer) -> dict[str, Any]:
    """class/*.png (optionally under train/, val/, test/ or one wrapping folder) as uint8 NCHW."""
    size = image_size_option(opts)
    infos = {i.filename: i for i in images.list_zip_members(path)}
    skipped: list[dict[str, str]] = []
    layout, class_names = images.plan_images([(n, i.file_size) for n, i in infos.items()], skipped)
    with zipfile.ZipFile(path) as zf:

        def read(name: str) -> bytes:
            # A member that does not inflate to its declared size (or CRC) marks a lying or damaged
            # archive: the whole file is refused, unlike an image that is merely undecodable.
            try:
                with zf.open(infos[name]) as f:
                    data = f.read(images.MAX_IMAGE_FILE_BYTES + 1)
                    extra = f.read(1)
            except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, ValueError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
                    raise
                raise DatasetError(
                    f"the ZIP file is damaged or its declared sizes lie ({name[:100]}: {exc}); refused"
                ) from exc
            if len(data) != infos[name].file_size or extra:
                raise DatasetError(f"the ZIP file's declared size of {name[:100]!r} is wrong; refused")
            return data

        return _ingest_images(layout, class_names, skipped, size, read, "zip", "ZIP file", w)


def _ingest_folder(root: Path, opts: dict[str, Any], w: _Writer) -> dict[str, Any]:
    """A folder of class subfolders (optionally under train/, val/, test/), as a ZIP would be read.

    Symbolic links are followed only when they stay inside the folder; one that points outside refuses
    the import. A file that cannot be read (permissions) refuses it too, with its path.
    """
    size = image_size_option(opts)
    root = root.resolve(strict=True)
    members: list[tuple[str, int]] = []
    real: dict[str, Path] = {}

    def refuse(err: OSError) -> None:
        raise DatasetError(
            f"cannot read the folder {_rel(root, Path(err.filename or root))!r}: {err.strerror}"
        )

    for dirpath, dirnames, filenames in os.walk(root, onerror=refuse, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            p = here / d
            if p.is_symlink():
                _inside(root, p)  # refuses a link out of the folder
                dirnames.remove(d)  # links to folders inside are not followed: no loops, no duplicates
        for f in filenames:
            p = here / f
            rel = _rel(root, p)
            if images.is_junk(rel):
                continue
            target = _inside(root, p) if p.is_symlink() else p
            try:
                st = target.stat()
            except OSError as exc:
                raise DatasetError(f"cannot read {rel!r} in the folder: {exc.strerror}") from exc
            if not stat.S_ISREG(st.st_mode):
                continue
            members.append((rel, st.st_size))
            real[rel] = target
    skipped: list[dict[str, str]] = []
    layout, class_names = images.plan_images(members, skipped, "folder")

    def read(name: str) -> bytes:
        try:
            fd = os.open(real[name], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                return f.read(images.MAX_IMAGE_FILE_BYTES + 1)
        except OSError as exc:
            raise DatasetError(f"cannot read {name!r} in the folder: {exc.strerror}") from exc

    return _ingest_images(layout, class_names, skipped, size, read, "folder", "folder", w)


def _rel(root: Path, p: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.name


def _inside(root: Path, link: Path) -> Path:
    """The resolved target of a symlink in the folder; DatasetError when it leaves the folder."""
    target = link.resolve()
    if target != root and root not in target.parents:
        raise DatasetError(
            f"{_rel(root, link)!r} is a symbolic link pointing outside the imported folder; refused"
        )
    return target


def _ingest_images(
    layout: dict[str, dict[str, list[str]]],
    class_names: list[str],
    skipped: list[dict[str, str]],
    size: tuple[int, int],
    read: Callable[[str], bytes],
    fmt: str,
    what: str,
    w: _Writer,
) -> dict[str, Any]:
    """Decode every image (in threads, in order) straight into x.npy as uint8 (N, 3, H, W)."""
    class_index = {name: i for i, name in enumerate(class_names)}
    given = [s for s in ("val", "test") if s in layout]
    pool_code = SPLIT_CODES["train"] if len(given) == 2 else -1
    order = [(split, cls, name) for split in SPLITS if split in layout
             for cls in sorted(layout[split]) for name in sorted(layout[split][cls])]  # fmt: skip
    w.start_x(np.uint8, (3, *size), len(order) * 3 * size[0] * size[1])
    gray = True
    kept = {s: 0 for s in SPLITS}
    workers = max(1, min(8, os.cpu_count() or 1))
    window: deque[tuple[str, str, str, Future]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="kd-ingest") as pool:

        def drain_one() -> None:
            nonlocal gray
            split, cls, name, fut = window.popleft()
            result = fut.result()
            if isinstance(result, str):
                images._skip(skipped, name, result)
                return
            hwc, is_gray = result
            gray = gray and is_gray
            code = pool_code if split == "train" else SPLIT_CODES[split]
            w.rows(hwc.transpose(2, 0, 1)[None], np.array([class_index[cls]]), code, [name])
            kept[split] += 1

        for i, (split, cls, name) in enumerate(order):
            data = read(name)
            if len(data) > images.MAX_IMAGE_FILE_BYTES:
                images._skip(skipped, name, f"larger than {images.MAX_IMAGE_FILE_BYTES // 1024**2} MiB")
                continue
            window.append((split, cls, name, pool.submit(images.decode_image, data, size)))
            if len(window) >= 4 * workers:
                drain_one()
            if i % 64 == 0:
                w.tick(i / max(1, len(order)))
        while window:
            drain_one()
    if not kept["train"]:
        raise DatasetError(images.no_images_message(skipped, what))
    if gray:
        _keep_one_channel(w)
    info: dict[str, Any] = {"color": "grayscale" if gray else "rgb", "image_size": list(size)}
    if skipped:
        info["skipped"] = skipped[: images.MAX_REPORTED_SKIPS]
        info["skipped_count"] = len(skipped)
    return {
        "format": fmt,
        "kind": "image",
        "x_scale": 1.0 / 255.0,
        "class_names": class_names,
        "num_classes": len(class_names),
        "labeled": True,
        "given_splits": given,
        "fingerprint_options": {"image_size": list(size), "color": info["color"]},
        "info": info,
    }


def _keep_one_channel(w: _Writer) -> None:
    """Every image was grayscale: rewrite x.npy with its first channel only (a third of the size)."""
    assert w.x is not None
    w.x.close()
    full = RowFile(w.x.path)
    one = _GrowingNpy(w.dir / "x1.npy", np.uint8, (1, *full.shape[2:]))
    step = max(1, CHUNK_BYTES // max(1, full.row_bytes))
    for start in range(0, len(full), step):
        one.append(full.read_range(start, start + step)[:, :1])
    one.close()
    full.close()
    os.replace(one.path, w.x.path)
    # finish() closes x again: point the writer at the rewritten file, already complete.
    w.x = _Closed(w.x.path)


class _Closed(_GrowingNpy):
    """An x.npy already written and closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(os.devnull, "wb")  # noqa: SIM115

    def close(self) -> None:
        self.f.close()


_READERS: dict[str, Callable[[Path, dict[str, Any], _Writer], dict[str, Any]]] = {
    "npz": _ingest_npz,
    "csv": _ingest_csv,
    "zip": _ingest_zip,
    "folder": _ingest_folder,
}


# ---------------------------------------------------------------- files given directly (CLI, tests)


def cache_root() -> Path:
    """Where stores of files given by path are kept: $KD_STORE_CACHE, or kd-studio-stores in the temp dir."""
    env = os.environ.get("KD_STORE_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "kd-studio-stores"


# Cached stores unused this long are removed when another one is made (a reader keeps its open files).
CACHE_MAX_AGE_S = 7 * 24 * 3600


def _prune_cache(root: Path) -> None:
    if not root.is_dir():
        return
    now = time.time()
    for entry in root.iterdir():
        with contextlib.suppress(OSError):
            if (
                not entry.name.startswith(".")
                and now - (entry / "meta.json").stat().st_mtime > CACHE_MAX_AGE_S
            ):
                shutil.rmtree(entry, ignore_errors=True)


def cached_store(path: Path, fmt: str, opts: dict[str, Any]) -> Path:
    """The store of file `path` read with `opts`, ingested on first use and found by content afterwards.

    Keyed by the file's sha256 and the options that shape the data, so an edited file is ingested
    anew; the same validation (ingest) runs for a file given by path and for an upload.
    """
    h = hashlib.sha256(f"kd-store-v{STORE_VERSION}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            h.update(block)
    shaping: dict[str, Any] = {"format": fmt}
    if fmt == "csv":
        shaping["label_column"] = opts.get("label_column")
    if fmt == "zip":
        shaping["image_size"] = list(image_size_option(opts))
    h.update(json.dumps(shaping, sort_keys=True).encode())
    dest = cache_root() / f"{path.stem[:40]}-{h.hexdigest()[:32]}"
    if is_store(dest):
        with contextlib.suppress(OSError):
            os.utime(dest / "meta.json")
        return dest
    _prune_cache(cache_root())
    ingest_opts = {k: v for k, v in opts.items() if k in ("label_column", "image_size")}
    ingest_opts["format"] = fmt
    try:
        ingest(path, dest, options=ingest_opts)
    except DatasetError:
        if is_store(dest):  # another process ingested the same file meanwhile
            return dest
        raise
    return dest
