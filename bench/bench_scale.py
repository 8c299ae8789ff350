"""Real-sized data: storage-format read throughput, ZIP-of-JPEGs ingest (images/s, peak RSS), store and loader reads.

- formats: random batches of 256 read single-threaded (images/s per core), page cache warm, at 224x224 and
  32x32: the raw uint8 store read with pread (what kd_core uses), the same through a numpy memmap,
  JPEG bytes decoded per batch with Pillow (the "keep compressed bytes" alternative), and an Arrow
  fixed-size-binary column `take` when pyarrow is importable (it is not a dependency);
- ingest: a generated ZIP of JPEGs at 224x224 across 10 classes (class-dependent stripes and colour plus
  noise, so a model can learn it) ingested by kd_core.data.store.ingest in a child process: images/s and
  that process's peak RSS (VmHWM);
- store read: Dataset.read of random training batches of 256 from that store;
- loader: kd_core.data.loader.make_batches with flip_crop on the CPU, batches of 256 at 224 px: images/s
  and images per CPU-second (per core) for 1 and 2 workers (30 steps, crossing epochs if the set is small).
Run: `python -m bench bench_scale` (or `make bench`), or `python -m bench.bench_scale --images 30000`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_result

BATCH = 256
CLASSES = 10


def class_image(label: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """HxWx3 uint8: a class colour and stripe frequency, a random phase, plus noise."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    freq = 2 + label
    angle = label * np.pi / CLASSES
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256], np.float32) / 255
    img = stripes[..., None] * (0.4 + 0.6 * colour) + rng.normal(0, 0.08, (side, side, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _rate(fn: Any, batches: list[np.ndarray]) -> float:
    fn(batches[0])  # warm
    start = time.perf_counter()
    for idx in batches:
        fn(idx)
    return len(batches) * BATCH / (time.perf_counter() - start)


def bench_formats(side: int, n: int, n_batches: int, tmp: Path) -> dict[str, float]:
    """images/s per core reading random batches, each candidate format."""
    from PIL import Image

    from kd_core.data.dataset import RowFile

    rng = np.random.default_rng(0)
    hwc = np.stack([class_image(i % CLASSES, rng, side) for i in range(n)])
    x = np.lib.format.open_memmap(tmp / f"x{side}.npy", mode="w+", dtype=np.uint8, shape=(n, 3, side, side))
    x[:] = hwc.transpose(0, 3, 1, 2)
    x.flush()
    del x
    blobs = [jpeg(a) for a in hwc]
    batches = [np.sort(rng.choice(n, BATCH, replace=False)) for _ in range(n_batches)]
    rows = RowFile(tmp / f"x{side}.npy")
    mm = np.load(tmp / f"x{side}.npy", mmap_mode="r")
    rows.read_range(0, n)  # page cache warm for every reader
    out = {
        "store_pread": _rate(rows.read_rows, batches),
        "numpy_memmap": _rate(lambda idx: np.ascontiguousarray(mm[idx]), batches),
    }

    def decode(idx: np.ndarray) -> np.ndarray:
        batch = np.empty((len(idx), side, side, 3), np.uint8)
        for k, i in enumerate(idx):
            with Image.open(io.BytesIO(blobs[i])) as img:
                img.draft("RGB", (side, side))
                batch[k] = np.asarray(img.convert("RGB"))
        return batch

    out["jpeg_pillow"] = _rate(decode, batches[: max(2, n_batches // 4)])
    out["jpeg_bytes_per_image"] = float(np.mean([len(b) for b in blobs]))
    try:
        import pyarrow as pa
    except ImportError:
        return out
    width = 3 * side * side
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(hwc.tobytes())])

    def arrow_take(idx: np.ndarray) -> np.ndarray:
        taken = col.take(pa.array(idx))
        return np.frombuffer(taken.buffers()[1], np.uint8).reshape(len(idx), side, side, 3).copy()

    out["arrow_take"] = _rate(arrow_take, batches)
    return out


def make_zip(path: Path, images: int, side: int) -> None:
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(images):
            label = i % CLASSES
            zf.writestr(f"c{label}/{i:06d}.jpg", jpeg(class_image(label, rng, side)))


INGEST_CHILD = """
import json, sys, time
from kd_core.data.store import ingest
start = time.perf_counter()
info = ingest(sys.argv[1], sys.argv[2], options={"image_size": int(sys.argv[3])})
took = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": took, "num_samples": info["num_samples"], "peak_rss_mib": hwm / 1024}))
"""


def bench_ingest(zip_path: Path, store: Path, side: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", INGEST_CHILD, str(zip_path), str(store), str(side)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["images_per_s"] = result["num_samples"] / result["seconds"]
    return result


def bench_store_read(store: Path, n_batches: int) -> float:
    from kd_core.data import load_dataset

    ds = load_dataset(store)
    rng = np.random.default_rng(2)
    n = ds.split_size("train")
    batches = [rng.choice(n, min(BATCH, n), replace=False) for _ in range(n_batches)]
    return _rate(lambda idx: ds.read("train", idx), batches)


def bench_loader(store: Path, workers: int, steps: int) -> tuple[float, float] | None:
    """(images/s, images per CPU-second of this process) of make_batches with flip_crop on the CPU.

    The second is the per-core figure: it holds when other processes share the cores, and times the
    cores a GPU worker gives its loader threads gives the rate it can feed.
    """
    try:
        from kd_core.data.loader import make_batches
    except ImportError:
        return None
    from kd_core.data import load_dataset

    ds = load_dataset(store)
    batches = make_batches(
        ds, "train", batch_size=BATCH, seed=0, device="cpu", augment="flip_crop", workers=workers,
        resident_max_bytes=0,
    )  # fmt: skip
    batches.get(0)  # steps past the first epoch read the next epoch's order: every step is a full batch
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(1, steps):
        batches.get(step)
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    if hasattr(batches, "close"):
        batches.close()
    return (steps - 1) * BATCH / took, (steps - 1) * BATCH / cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs in the generated ZIP (default 3000)")
    parser.add_argument("--side", type=int, default=224)
    args = parser.parse_args([] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="kd-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        formats = {
            "224": bench_formats(224, 1000, 40, tmp),
            "32": bench_formats(32, 20_000, 400, tmp),
        }
        print_table(
            ["side", *formats["224"].keys()],
            [[side, *values.values()] for side, values in formats.items()],
        )
        zip_path = tmp / "images.zip"
        start = time.perf_counter()
        make_zip(zip_path, args.images, args.side)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - start:.1f} s")
        ingest = bench_ingest(zip_path, tmp / "store", args.side)
        read = bench_store_read(tmp / "store", 40)
        loader = {w: bench_loader(tmp / "store", w, 30) for w in (1, 2)}
        rows = [
            ["ingest ZIP of JPEGs (images/s)", ingest["images_per_s"]],
            ["ingest peak RSS (MiB)", ingest["peak_rss_mib"]],
            ["store read, 1 thread (images/s)", read],
            *[[f"loader flip_crop, {w} worker(s) (images/s)", v[0]] for w, v in loader.items() if v],
            *[[f"loader flip_crop, {w} worker(s) (images/CPU-s)", v[1]] for w, v in loader.items() if v],
        ]
        print_table(["measure", "value"], rows)
        path = write_result(
            "bench_scale",
            {
                "images": args.images,
                "side": args.side,
                "zip_bytes": zip_path.stat().st_size,
                "formats_images_per_s_per_core": formats,
                "ingest": ingest,
                "store_read_images_per_s": read,
                "loader_flip_crop_images_per_s": {str(w): v and v[0] for w, v in loader.items()},
                "loader_flip_crop_images_per_cpu_s": {str(w): v and v[1] for w, v in loader.items()},
                "cpu_count": os.cpu_count(),
            },
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
