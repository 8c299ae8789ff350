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
- train: a job end to end through kd_core the way a worker runs one (store → `load_experiment_dataset` →
  `run_experiment` on the CPU, no export) in a fresh child process per job, on an NPZ of uint8 images at
  224x224 (tiny cnn) and on CIFAR-sized 32x32x3 images (CIFAR-style resnet depth 8), both ingested first:
  seconds from the job's start (after its imports) to the first optimisation step, training samples/s and
  samples per CPU-second of the process (steadier than samples/s on a shared machine), the process's peak
  RSS while training and overall (`os.wait4`'s ru_maxrss; the final evaluation runs batches of
  `kd_core.trainer.EVAL_BATCH` rows, which at 224 px can dominate it), beside what a float32 copy of the whole
  set would take.
Run: `python -m bench bench_scale` (or `make bench`: small sizes), or the issue's sizes:
`python -m bench.bench_scale --images 30000`, `python -m bench.bench_scale --only train --train-images 6000
--cifar-images 50000 --train-steps 30 --cifar-steps 150`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
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


ROOT = Path(__file__).resolve().parent.parent


def write_image_npz(path: Path, n: int, side: int, chunk: int = 256) -> None:
    """An NPZ of `n` learnable uint8 images (N, 3, side, side) and labels, written without holding them all.

    Each class has a stripe pattern (class_image); each image is it shifted at random plus noise drawn
    from a small bank, so generating 6,000 images at 224 px takes seconds, not minutes.
    """
    rng = np.random.default_rng(3)
    patterns = np.stack([class_image(c, rng, side).transpose(2, 0, 1) for c in range(CLASSES)]).astype(
        np.int16
    )
    noise = rng.integers(-24, 25, size=(16, 3, side, side), dtype=np.int16)
    y = (np.arange(n) % CLASSES).astype(np.int64)
    rng.shuffle(y)
    tmp = path.with_suffix(".x.npy")
    x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, side, side))
    for start in range(0, n, chunk):
        labels = y[start : start + chunk]
        shifts = rng.integers(0, side, size=(len(labels), 2))
        block = np.stack([np.roll(patterns[c], tuple(s), axis=(1, 2)) for c, s in zip(labels, shifts)])
        block += noise[rng.integers(0, len(noise), len(labels))]
        x[start : start + len(labels)] = np.clip(block, 0, 255)
    x.flush()
    # np.savez writes a memmap in buffered chunks: the parent never holds the whole array either.
    np.savez(path, x=x, y=y, class_names=np.array([f"c{c}" for c in range(CLASSES)]))
    del x
    tmp.unlink()


def ingest_store(source: Path, store: Path) -> dict[str, float]:
    """kd_core's ingest of `source` in a child: seconds and that child's peak RSS."""
    out = subprocess.run(
        [sys.executable, "-c", INGEST_CHILD, str(source), str(store), "32"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_child(argv: list[str]) -> None:
    """One job as a worker runs it (after its imports): print JSON timings. Run in a child by bench_train."""
    started = time.monotonic()
    job = json.loads(argv[0])
    from kd_core.config import parse_config
    from kd_core.runner import load_experiment_dataset, run_experiment

    job_start = time.monotonic()

    class StepTimes:
        """A metrics sink that keeps when each training step was logged (log_every 1)."""

        def __init__(self) -> None:
            self.steps: list[tuple[int, float, float, float]] = []

        def log(self, step: int, values: dict[str, float]) -> None:
            if "lr" in values:
                self.steps.append((step, time.monotonic(), cpu_seconds(), vm_hwm_mib()))

        def status(self, progress: float, eta_s: float | None) -> None:
            pass

    config = parse_config(job["config"])
    config.dataset = job["store"]
    sink = StepTimes()
    dataset = load_experiment_dataset(config)
    loaded = time.monotonic()
    result = run_experiment(
        config, dataset=dataset, out_dir=job["out"], sink=sink, device="cpu", export=False
    )
    ended = time.monotonic()
    # The last step's log comes after the final evaluation: rates and the training-only peak stop before it.
    (first_step, first, first_cpu, _), (last_step, last, last_cpu, hwm_training) = (
        sink.steps[0],
        sink.steps[-2],
    )
    samples = (last_step - first_step) * config.batch_size
    print(json.dumps({
        "seconds_job_start_to_first_step": first - job_start,
        "seconds_process_start_to_first_step": first - started,  # plus the interpreter's own start
        "seconds_imports": job_start - started,
        "seconds_load_dataset": loaded - job_start,
        "seconds_total": ended - started,
        "steps": sink.steps[-1][0],
        "samples_per_s": samples / max(last - first, 1e-9),
        # Per CPU-second of the process (all its threads): what the step costs, whatever else runs.
        "samples_per_cpu_s": samples / max(last_cpu - first_cpu, 1e-9),
        "test_acc": result.metrics.get("test_acc"),
        "train_samples": dataset.split_size("train"),
        "float32_copy_of_whole_set_gib": sum(dataset.nbytes_float32(s) for s in ("train", "val", "test")) / 1024**3,
        "vm_hwm_training_mib": hwm_training,
        "vm_hwm_mib": vm_hwm_mib(),
    }))  # fmt: skip


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def reference_child(argv: list[str]) -> None:
    """A hand-written loop over the training rows held in memory as float32 (the path before the store):
    same model, batch and optimiser as the job; print its training samples/s and samples per CPU-second."""
    import torch
    from torch.nn import functional as F

    from kd_core.models import build_model

    job = json.loads(argv[0])
    config = job["config"]
    x_all = np.load(Path(job["store"]) / "x.npy", mmap_mode="r")
    y_all = np.load(Path(job["store"]) / "y.npy")
    n = int(len(y_all) * 0.7)  # about the training split
    x = torch.from_numpy(np.ascontiguousarray(x_all[:n])).float()
    y = torch.from_numpy(y_all[:n])
    torch.manual_seed(0)
    model = build_model(config["model"], tuple(x.shape[1:]), int(y_all.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, times = config["batch_size"], []
    for _ in range(config["max_steps"]):
        idx = torch.randint(0, n, (batch,))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
        times.append((time.monotonic(), cpu_seconds()))
    (first, first_cpu), (last, last_cpu) = times[0], times[-1]
    samples = (len(times) - 1) * batch
    print(
        json.dumps(
            {"samples_per_s": samples / (last - first), "samples_per_cpu_s": samples / (last_cpu - first_cpu)}
        )
    )


def bench_reference(store: Path, config: dict[str, Any]) -> dict[str, Any]:
    """reference_child in a child process (its float32 copy must not count in the job's RSS)."""
    code = "import sys; from bench.bench_scale import reference_child; reference_child(sys.argv[1:])"
    job = json.dumps({"config": config, "store": str(store)})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, job], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train(store: Path, config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run train_child in a child process; its figures plus its peak RSS from the kernel (ru_maxrss)."""
    job = json.dumps({"config": config, "store": str(store), "out": str(out)})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from bench.bench_scale import train_child; train_child(sys.argv[1:])"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, job], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"training child failed ({proc.returncode})")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result["seconds_spawn_to_exit"] = time.monotonic() - start
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def train_runs(tmp: Path, cases: list[tuple[str, int, int, dict, int, int]], repeat: int) -> dict[str, Any]:
    """The issue's Train measurements, each case (name, images, side, model, batch, steps) on its own store.

    Every job is a fresh process on the same store: the first computes the training statistics (cached
    beside the store), later ones read them.
    """
    out: dict[str, Any] = {}
    for name, n, side, model, batch, steps in cases:
        if n <= 0:
            continue
        npz, store = tmp / f"{name}.npz", tmp / f"{name}-store"
        start = time.perf_counter()
        write_image_npz(npz, n, side)
        generated = time.perf_counter() - start
        ingested = ingest_store(npz, store)
        npz.unlink()  # the job reads the store only
        config = {"kind": "train", "name": name, "dataset": "x", "model": model, "epochs": 1,
                  "batch_size": batch, "max_steps": steps, "log_every": 1, "seed": 0}  # fmt: skip
        jobs, references = [], []
        for k in range(max(1, repeat)):  # interleaved, so both see the same machine load
            jobs.append(bench_train(store, config, tmp / f"{name}-out{k}"))
            references.append(bench_reference(store, config))
        out[name] = {"images": n, "side": side, "model": model, "batch_size": batch, "max_steps": steps,
                     "seconds_generate_npz": generated, "ingest": ingested, "jobs": jobs,
                     "in_memory_reference": references,
                     "load_average": os.getloadavg()}  # fmt: skip
        shutil.rmtree(store, ignore_errors=True)
    return out


def print_train(train: dict[str, Any]) -> None:
    rows = []
    for name, r in train.items():
        for k, (j, ref) in enumerate(zip(r["jobs"], r["in_memory_reference"])):
            rows.append([f"{name} job {k + 1}", r["images"], j["seconds_job_start_to_first_step"],
                         j["samples_per_s"], j["samples_per_cpu_s"], ref["samples_per_s"], ref["samples_per_cpu_s"],
                         j["vm_hwm_training_mib"], j["peak_rss_mib"], j["float32_copy_of_whole_set_gib"] * 1024])  # fmt: skip
    print_table(["train", "images", "job→step1 s", "samples/s", "samples/CPU-s", "in-memory loop samples/s",
                 "in-memory samples/CPU-s", "peak RSS training MiB", "peak RSS MiB", "float32 copy MiB"], rows)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs in the generated ZIP (default 3000)")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument(
        "--only",
        choices=("all", "ingest", "train"),
        default="all",
        help="ingest: formats, ZIP ingest, store and loader reads; train: the job measurements",
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=600,
        help="uint8 224x224 images in the training NPZ (the issue: 6000; 0 skips it)",
    )
    parser.add_argument(
        "--cifar-images",
        type=int,
        default=5000,
        help="CIFAR-sized 32x32x3 images (the issue: 50000; 0 skips it)",
    )
    parser.add_argument("--train-steps", type=int, default=10, help="steps of each 224 px job (tiny cnn)")
    parser.add_argument(
        "--cifar-steps", type=int, default=40, help="steps of each CIFAR-sized job (resnet 8)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="jobs per store (the first computes its statistics)"
    )
    args = parser.parse_args([] if argv is None else argv)
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="kd-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        if args.only in ("all", "ingest"):
            result.update(bench_ingest_and_reads(tmp, args.images, args.side))
        if args.only in ("all", "train"):
            cases = [
                ("npz_224", args.train_images, 224, {"arch": "cnn", "channels": [8, 16]}, 64, args.train_steps),
                ("cifar_32", args.cifar_images, 32, {"arch": "resnet", "depth": 8, "width": 1}, 64, args.cifar_steps),
            ]  # fmt: skip
            train = train_runs(tmp, cases, args.repeat)
            print_train(train)
            result["train"] = train
    result["load_average_after"] = os.getloadavg()
    name = "bench_scale" if args.only == "all" else f"bench_scale_{args.only}"
    path = write_result(name, result)
    print(f"wrote {path}")


def bench_ingest_and_reads(tmp: Path, images: int, side: int) -> dict[str, Any]:
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
    make_zip(zip_path, images, side)
    print(f"generated {images} JPEGs in {time.perf_counter() - start:.1f} s")
    ingest = bench_ingest(zip_path, tmp / "store", side)
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
    out = {
        "images": images,
        "side": side,
        "zip_bytes": zip_path.stat().st_size,
        "formats_images_per_s_per_core": formats,
        "ingest": ingest,
        "store_read_images_per_s": read,
        "loader_flip_crop_images_per_s": {str(w): v and v[0] for w, v in loader.items()},
        "loader_flip_crop_images_per_cpu_s": {str(w): v and v[1] for w, v in loader.items()},
    }
    zip_path.unlink()
    shutil.rmtree(tmp / "store", ignore_errors=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
