"""Command line: `python -m kd_core run CONFIG.json --out DIR` and `python -m kd_core demo`."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd_core.errors import ConfigError, KDError

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only when a command runs
    from kd_core.config import ExperimentConfig
    from kd_core.runner import RunResult

MAX_CONFIG_BYTES = 1024 * 1024
# bench/bench_quality.py: on digits this pair gains about one point of test accuracy from distillation.
DEMO_TEACHER = {"arch": "cnn", "channels": [32, 64]}
DEMO_STUDENT = {"arch": "mlp", "hidden": [64]}


class StopFlag:
    """First Ctrl-C asks the run to stop (what was trained is still exported); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _read_config(path: Path) -> ExperimentConfig:
    from kd_core.config import parse_config

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path.name} is larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path.name} is not valid JSON: {exc}") from None
    return parse_config(data)


def _resolve_file(value: Any, what: str, base: Path) -> Path:
    """A path as given (relative to the working directory), else relative to the config file."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ConfigError(f"in the command line '{what}' is a file path, not a database id ({value!r})")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (base / path).exists():
        return base / path
    return path


def _results_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    cols = [
        ("val_acc", "val acc", "{:.4f}"),
        ("test_acc", "test acc", "{:.4f}"),
        ("student_params", "params", "{:,.0f}"),  # codistill reports it as a float
        ("student_latency_ms", "latency ms", "{:.3f}"),
    ]
    header = ["model", *(c[1] for c in cols)]
    body = []
    for name, m in rows:
        cells = [name]
        for key, _, fmt in cols:
            v = m.get(key)
            cells.append("-" if v is None else fmt.format(v))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _run_one(
    config: ExperimentConfig,
    dataset: Any,
    teacher: Any,
    out_dir: Path,
    device: str,
    cache_dir: Path | None,
    stop: StopFlag,
    label: str,
) -> RunResult:
    from kd_core.runner import run_experiment
    from kd_core.sinks import CsvSink, MultiSink, ProgressBarSink

    out_dir.mkdir(parents=True, exist_ok=True)
    sink = MultiSink(CsvSink(out_dir / "metrics.csv"), ProgressBarSink(label))
    try:
        return run_experiment(
            config,
            dataset=dataset,
            teacher=teacher,
            out_dir=out_dir,
            sink=sink,
            should_stop=stop,
            device=device,
            cache_dir=cache_dir,
        )
    finally:
        sink.close()


def cmd_run(args: argparse.Namespace) -> int:
    from kd_core.checkpoints import load_teacher
    from kd_core.data import BUILTIN_DATASETS
    from kd_core.runner import load_experiment_dataset

    config_path = Path(args.config)
    config = _read_config(config_path)
    base = config_path.resolve().parent
    source = config.dataset
    if not (isinstance(source, str) and source in BUILTIN_DATASETS):
        source = _resolve_file(source, "dataset", base)
    dataset = load_experiment_dataset(config, source)
    teacher = None
    if config.kind == "distill":
        teacher = load_teacher(
            _resolve_file(config.teacher, "teacher", base),
            arch=config.teacher_arch,
            input_shape=tuple(dataset.input_shape),
            num_classes=dataset.num_classes,
            preprocessing=config.teacher_preprocessing,
        )
    if config.init is not None:  # a path, relative to the config file like the teacher's
        config.init = str(_resolve_file(config.init, "init", base))
    out = Path(args.out)
    with StopFlag().installed() as stop:
        label = config.name or config.kind
        result = _run_one(config, dataset, teacher, out, args.device, args.cache_dir, stop, label)
    rows = []
    if teacher is not None:
        m = result.metrics
        rows.append(
            (
                "teacher",
                {
                    "test_acc": m.get("teacher_acc"),
                    "student_params": m.get("teacher_params"),
                    "student_latency_ms": m.get("teacher_latency_ms"),
                },
            )
        )
    rows.append((config.name or config.kind, result.metrics))
    print(_results_table(rows))
    if "compression" in result.metrics or "speedup" in result.metrics:
        c, s = result.metrics.get("compression"), result.metrics.get("speedup")
        print("compression " + (f"{c:.1f}x" if c else "-") + ", CPU speedup " + (f"{s:.1f}x" if s else "-"))
    if result.metrics.get("stopped_by") == "time_limit":
        print(f"time limit of {config.time_limit_s:g} s reached: the files hold the model trained so far")
    elif result.stopped:
        print("stopped early: the files hold the model trained so far")
    print(
        f"wrote {out / 'result.json'}, {out / 'metrics.csv'} and {', '.join(Path(p).name for p in result.files.values())}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a teacher on digits, then a small student alone and distilled from that teacher."""
    import torch

    from kd_core.checkpoints import load_teacher
    from kd_core.config import ExperimentConfig
    from kd_core.runner import load_experiment_dataset

    # Models this small gain nothing from more threads, and lose a lot when the cores are busy.
    torch.set_num_threads(1)
    out = Path(args.out)
    # Distillation needs longer training than hard labels to pay off (see bench/bench_quality.py).
    common = {"dataset": "digits", "epochs": 100, "batch_size": 64, "lr": 0.003, "seed": 0, "log_every": 20}
    dataset = load_experiment_dataset(ExperimentConfig(**common))
    runs = [
        (
            "teacher",
            ExperimentConfig(kind="train", name="teacher", model=DEMO_TEACHER, **{**common, "epochs": 40}),
        ),
        ("student alone", ExperimentConfig(kind="train", name="student", model=DEMO_STUDENT, **common)),
        (
            "distilled",
            ExperimentConfig(
                kind="distill", name="distilled", model=DEMO_STUDENT, teacher="teacher", **common
            ),
        ),
    ]
    rows = []
    teacher = None
    with StopFlag().installed() as stop:
        for label, config in runs:
            result = _run_one(
                config, dataset, teacher, out / config.name, args.device, out / "cache", stop, label
            )
            rows.append((label, result.metrics))
            if label == "teacher":
                teacher = load_teacher(result.files["safetensors"])
            if result.stopped:
                break
    print(_results_table(rows))
    if teacher is not None:
        print(f"teacher files in {out / 'teacher'}; the distilled student's in {out / 'distilled'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-studio", description="KD Studio's engine, without the web app.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment config (train, distill or codistill)")
    run.add_argument("config", help="experiment config JSON (the schema of the REST API)")
    run.add_argument("--out", required=True, help="output folder: result.json, metrics.csv, student.*")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    run.add_argument("--cache-dir", type=Path, default=None, help="keep teacher logits here between runs")
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="teacher vs student alone vs distilled student on digits")
    demo.add_argument("--out", default="kd-demo", help="output folder (default ./kd-demo)")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable or unwritable files the user named
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
