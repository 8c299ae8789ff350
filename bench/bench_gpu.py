"""Distillation throughput on a GPU: a torchvision ResNet-50 teacher into ResNet-18 and MobileNetV3 students.

On a generated image store (224 px by default) it measures, per student: images/s of the teacher-logit phase
(the fp16 cache filled once), images/s of the engine's distill loop for a fixed number of steps, the same
for a plain hand-written loop on the same device (data resident, logits precomputed, the same precision,
memory format and compile), the ratio engine/hand (aim: at most 1.1x the hand loop's time) and peak GPU
memory per phase. The engine runs with the GPU path's options: `precision` (default "auto": bf16 autocast
where the GPU has it, else fp16 with a loss scaler), `channels_last` (on unless --no-channels-last) and
`compile` (--compile; a failed compile falls back to eager and the table says so).
Without a GPU, or with --smoke, it runs a small CPU smoke size (say so in any figures quoted); without
torchvision it skips.

    python -m bench.bench_gpu [--size 224 --samples 2048 --steps 100 --batch 64 --device cuda]
                              [--precision auto|fp32|bf16|fp16] [--no-channels-last] [--compile] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import print_table, write_result
from kd_core.models.library import available

TEACHER = {"arch": "torchvision", "name": "resnet50"}
STUDENTS = {
    "resnet18": {"arch": "torchvision", "name": "resnet18"},
    "mobilenet_v3_small": {"arch": "torchvision", "name": "mobilenet_v3_small"},
}
CLASSES = 10


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _steps(fn, steps: int) -> float:
    """Seconds for `steps` calls of fn(i). No untimed warm-up: the engine's samples_per_s has none either, so
    with --compile both figures include the compilation."""
    start = time.perf_counter()
    for i in range(steps):
        fn(i)
    return time.perf_counter() - start


def _make_store(folder: Path, size: int, samples: int):
    """A uint8 NPZ of class-dependent colour patterns, ingested into the on-disk store the loader reads."""
    from kd_core.config import ExperimentConfig
    from kd_core.runner import load_experiment_dataset

    rng = np.random.default_rng(0)
    y = np.arange(samples) % CLASSES
    proto = rng.integers(0, 256, size=(CLASSES, 3, 1, 1))
    noise = rng.integers(0, 64, size=(samples, 3, size, size))
    x = np.clip(proto[y] + noise - 32, 0, 255).astype(np.uint8)
    path = folder / f"gen{size}.npz"
    np.savez(path, x=x, y=y)
    return load_experiment_dataset(ExperimentConfig(dataset=str(path), val_fraction=0.05, test_fraction=0.05))


def _hand_loop(
    student,
    teacher_logits,
    x,
    y,
    *,
    scale: float,
    steps: int,
    batch: int,
    device,
    temperature: float,
    precision: str,
    channels_last: bool,
    compile: bool,
) -> float:
    """What a person would write: resident data, precomputed teacher logits, Adam, Hinton KD, autocast
    (with a GradScaler for fp16), the same memory format and torch.compile as the engine was given."""
    from kd_core.device import autocast_dtype

    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    dtype = autocast_dtype(device, precision)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    if channels_last:
        student.to(memory_format=torch.channels_last)
    forward = torch.compile(student) if compile else student
    student.train()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step(i: int) -> None:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen).to(device)
        xb = x[idx].float() * scale  # the stored pixels as the model sees them, as the engine's loader does
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward(xb)
        soft = F.kl_div(
            F.log_softmax(out.float() / temperature, 1),
            F.softmax(teacher_logits[idx].float() / temperature, 1),
            reduction="batchmean",
        )
        loss = 0.9 * temperature**2 * soft + 0.1 * F.cross_entropy(out.float(), y[idx])
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device.type == "cuda" and i == steps - 1:
            torch.cuda.synchronize(device)

    return steps * batch / _steps(step, steps)


def run(
    size: int,
    samples: int,
    steps: int,
    batch: int,
    device_name: str,
    *,
    precision: str = "auto",
    channels_last: bool = True,
    compile: bool = False,
) -> dict:
    from kd_core.cache import TeacherLogitCache
    from kd_core.checkpoints import load_teacher
    from kd_core.config import ExperimentConfig
    from kd_core.data.loader import iterate
    from kd_core.device import autocast_dtype, precision_name
    from kd_core.export import export_model
    from kd_core.models import build_model
    from kd_core.runner import run_experiment
    from kd_core.sinks import NullSink

    device = torch.device(device_name)
    out: dict = {
        "size": size,
        "samples": samples,
        "steps": steps,
        "batch": batch,
        "device": str(device),
        "precision": precision,
        "computes_in": precision_name(autocast_dtype(device, precision)),
        "channels_last": channels_last,
        "compile": compile,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = _make_store(tmp, size, samples)
        shape, classes = tuple(dataset.input_shape), int(dataset.num_classes)
        torch.manual_seed(0)
        net = build_model(TEACHER, shape, classes, dataset.preprocessing).eval()
        sample = torch.rand(2, *shape)
        path = export_model(net, tmp / "t", sample_inputs=sample, formats=["safetensors"])["safetensors"]
        teacher = load_teacher(path).to(device)

        _peak_reset(device)
        cache = TeacherLogitCache(tmp / "cache")
        start = time.perf_counter()
        cached = cache.split_logits(teacher, dataset, "train", device=device)
        n_train = dataset.split_size("train")
        out["teacher_images_per_s"] = n_train / (time.perf_counter() - start)
        out["teacher_peak_mb"] = _peak_mb(device)

        # Resident copies for the hand loop: the same split, the same logits.
        xs, ys = [], []
        for xb, yb, _idx in iterate(dataset, "train", batch_size=256, device="cpu"):
            xs.append((xb / dataset.x_scale).round().to(torch.uint8))
            ys.append(yb)
        x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
        logits = cached.tensor(device)
        cache.close()

        for name, spec in STUDENTS.items():
            config = ExperimentConfig(
                kind="distill", dataset=str(tmp), model=spec, epochs=1000, max_steps=steps, batch_size=batch,
                log_every=max(1, steps), val_fraction=0.05, test_fraction=0.05, seed=0,
                precision=precision, channels_last=channels_last, compile=compile,
            )  # fmt: skip
            _peak_reset(device)
            torch.manual_seed(0)
            result = run_experiment(
                config, dataset=dataset, teacher=teacher, out_dir=tmp / name, sink=NullSink(),
                device=device, cache_dir=tmp / "cache", export=False,
            )  # fmt: skip
            engine = result.metrics["samples_per_s"]
            engine_peak = _peak_mb(device)
            torch.manual_seed(0)
            student = build_model(spec, shape, classes, dataset.preprocessing).to(device)
            _peak_reset(device)
            hand = _hand_loop(
                student, logits, x, y, scale=dataset.x_scale, steps=steps, batch=batch, device=device,
                temperature=4.0, precision=precision, channels_last=channels_last, compile=compile,
            )  # fmt: skip
            m = result.metrics
            out[name] = {
                "engine_images_per_s": engine,
                "hand_images_per_s": hand,
                "engine_time_ratio": hand / engine if engine else None,
                "engine_peak_mb": engine_peak,
                "hand_peak_mb": _peak_mb(device),
                # The engine's own figures for its training loop (what a job's result reports).
                "loop_gpu_peak_allocated_mb": m.get("gpu_peak_allocated_mb"),
                "loop_gpu_peak_reserved_mb": m.get("gpu_peak_reserved_mb"),
                "process_peak_rss_mb": m.get("process_peak_rss_mb"),
                "engine_precision": m.get("precision"),
                "engine_compiled": m.get("compiled"),
                "notes": m.get("notes", []),
            }
        teacher.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile both loops (engine: with fallback)"
    )
    parser.add_argument("--smoke", action="store_true", help="the small CPU smoke size, GPU or not")
    args = parser.parse_args(argv if argv is not None else [])
    if args.smoke:
        args.device = "cpu"
    if not available("torchvision"):
        print(
            "bench_gpu: torchvision does not import here; skipped (install torch==2.14.1 torchvision==0.29.1)"
        )
        return
    gpu = args.device.startswith("cuda")
    # A GPU gets the real size; a CPU a smoke size that shows the script works, not GPU figures.
    size = args.size or (224 if gpu else 64)
    samples = args.samples or (2048 if gpu else 96)
    steps = args.steps or (100 if gpu else 3)
    batch = args.batch or (64 if gpu else 16)
    if not gpu:
        print(f"bench_gpu: no GPU; CPU smoke run at {size} px, {steps} steps (not GPU figures)")
    result = run(
        size,
        samples,
        steps,
        batch,
        args.device,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    print(
        f"precision {args.precision} (computes in {result['computes_in']}), channels_last {args.channels_last}, "
        f"compile {args.compile}"
    )
    rows = [
        ["teacher resnet50 logits", result["teacher_images_per_s"], "", "", result["teacher_peak_mb"] or "-"]
    ]
    for name in STUDENTS:
        r = result[name]
        rows.append(
            [f"distill -> {name}", r["engine_images_per_s"], r["hand_images_per_s"], r["engine_time_ratio"],
             r["engine_peak_mb"] or "-"]
        )  # fmt: skip
    print_table(["phase", "engine images/s", "hand images/s", "engine/hand time", "peak GPU MB"], rows)
    for name in STUDENTS:
        for note in result[name]["notes"]:
            print(f"{name}: {note}")
    write_result("gpu" if gpu else "gpu-cpu-smoke", result)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
