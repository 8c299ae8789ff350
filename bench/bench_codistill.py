"""Codistillation at small scale (Anil et al. 2018): vs one replica and independent replicas, churn, exchange period, throughput.

Parts (all by default; name some to run only those: `python -m bench.bench_codistill keep`):
- quality: final/min validation loss, accuracy, ensemble, churn and steps to a target loss per exchange period;
- keep: test churn of two codistilled replicas vs two independent ones with `keep` "best" and "last", on
  digits with 30% of the train AND validation labels wrong (a user's validation labels are as noisy as
  the training ones, so "best on validation" is early stopping on noise; issue 11);
- throughput: samples/s per replica in each placement;
- batching: one step of N replicas, a Python loop vs torch.func vmap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import mean_std, print_table, write_result
from kd_core.codistill import run_codistill
from kd_core.config import CodistillConfig, parse_config
from kd_core.data import load_dataset
from kd_core.data.dataset import flip_labels
from kd_core.sinks import ListSink

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
EXCHANGE_PERIODS = (1, 10, 50, 200)
DATASETS = {
    # Noisy labels on a small training set: plain training memorises the noise, which is where
    # codistillation's regularisation should show (clean validation labels).
    "synthetic-noise0.3": (
        "synthetic",
        {"n_samples": 1000, "n_features": 20, "n_classes": 4, "label_noise": 0.3},
    ),
    "digits": ("digits", {}),
}
STEPS = 1200
BURN_IN = 100
THROUGHPUT_STEPS = 600
PARTS = ("quality", "keep", "throughput", "batching")
# keep part: label noise on train and validation; the codistillation settings a user gets by default.
KEEP_NOISE = 0.3
KEEP_CODISTILL = CodistillConfig()


def _config(name: str, seed: int, replicas: int, burn_in: int, every: int, steps: int = STEPS, **extra: Any):
    source, options = DATASETS[name]
    cd = {
        "replicas": replicas,
        "burn_in_steps": burn_in,
        "exchange_every": every,
        **extra.pop("codistill", {}),
    }
    return parse_config(
        {
            "kind": "codistill",
            "dataset": source,
            "data_options": options,
            "model": {"arch": "mlp", "hidden": [128, 128]},
            "epochs": 10_000,
            "max_steps": steps,
            "batch_size": 64,
            "lr": 0.001,
            "schedule": "none",
            "log_every": 10,
            "seed": seed,
            "codistill": cd,
            **extra,
        }
    )


def _curves(sink: ListSink, replicas: int) -> list[list[tuple[int, float]]]:
    return [sink.series(f"replica{k}/val/loss") for k in range(replicas)]


def _first_step_below(curve: list[tuple[int, float]], target: float) -> float:
    return next((float(s) for s, v in curve if v <= target), math.nan)


def _run(cfg, dataset, out: Path) -> dict[str, Any]:
    sink = ListSink()
    result = run_codistill(cfg, dataset, out_dir=out, sink=sink, device="cpu", export=False)
    n = cfg.codistill.replicas
    m = result.metrics
    return {
        "curves": _curves(sink, n),
        "val_loss": sum(c[-1][1] for c in _curves(sink, n)) / n,  # mean over replicas: no best-of-N bonus
        "val_acc": sum(m[f"replica{k}_val_acc"] for k in range(n)) / n,  # kept (best-on-val) weights
        "test_acc": sum(m[f"replica{k}_test_acc"] for k in range(n)) / n,  # unbiased by that choice
        "ens_test_acc": m["ensemble_test_acc"],
        "ens_acc": m["ensemble_val_acc"],
        "ens_loss": m["ensemble_val_loss"],
        "churn": m["churn"],
        "time_s": m["train_time_s"],
    }


def quality(tmp: Path) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """Final validation loss/accuracy, steps to a target loss, ensemble and churn, over SEEDS."""
    methods = {"1 replica": (1, 0, 1), "2 independent": (2, STEPS, 1)}
    methods |= {f"codistill E={e}": (2, BURN_IN, e) for e in EXCHANGE_PERIODS}
    records, rows = [], []
    for name, (source, options) in DATASETS.items():
        dataset = load_dataset(source, options=options, seed=0)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for seed in SEEDS:
            for method, (replicas, burn_in, every) in methods.items():
                cfg = _config(name, seed, replicas, burn_in, every)
                runs[method].append(_run(cfg, dataset, tmp / "q"))
            # The target: the best validation loss one replica alone ever reaches (with this seed).
            target = min(v for _, v in runs["1 replica"][-1]["curves"][0])
            for method in methods:
                r = runs[method][-1]
                r["target"] = target
                r["steps_to_target"] = [_first_step_below(c, target) for c in r["curves"]]
        for method in methods:
            rs = runs[method]
            reach = [s for r in rs for s in r["steps_to_target"]]
            reached = [s for s in reach if not math.isnan(s)]
            rec = {
                "dataset": name,
                "method": method,
                "val_loss": mean_std([r["val_loss"] for r in rs]),
                "val_acc": mean_std([r["val_acc"] for r in rs]),
                "ensemble_val_acc": mean_std([r["ens_acc"] for r in rs]) if method != "1 replica" else None,
                "test_acc": mean_std([r["test_acc"] for r in rs]),
                "ensemble_test_acc": (
                    mean_std([r["ens_test_acc"] for r in rs]) if method != "1 replica" else None
                ),
                "churn": mean_std([r["churn"] for r in rs]) if method != "1 replica" else None,
                "steps_to_target": mean_std(reached) if reached else None,
                "reached_target": f"{len(reached)}/{len(reach)}",
                "min_val_loss": mean_std([min(v for c in r["curves"] for _, v in c) for r in rs]),
                "time_s": mean_std([r["time_s"] for r in rs]),
            }
            records.append(rec)
            rows.append(
                [
                    name,
                    method,
                    _pm(rec["val_loss"]),
                    _pm(rec["min_val_loss"]),
                    _pm(rec["val_acc"]),
                    _pm(rec["test_acc"]),
                    _pm(rec["ensemble_val_acc"]),
                    _pm(rec["ensemble_test_acc"]),
                    _pm(rec["churn"]),
                    (f"{rec['steps_to_target'][0]:.0f}" if rec["steps_to_target"] else "-")
                    + f" ({rec['reached_target']})",
                ]
            )
    return records, rows


def _pm(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{ms[0]:.3f}±{ms[1]:.3f}"


def _noisy_digits() -> Any:
    """digits with KEEP_NOISE of the train and the validation labels flipped to another class (test clean)."""
    full = load_dataset("digits", seed=0)
    n = full.num_classes
    return dataclasses.replace(
        full,
        y_train=flip_labels(full.y_train, KEEP_NOISE, n, seed=1),
        y_val=flip_labels(full.y_val, KEEP_NOISE, n, seed=2),
        fingerprint=f"{full.fingerprint}:noise{KEEP_NOISE}-train-val",
    )


def keep_churn(tmp: Path) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """Test churn, codistilled vs independent pairs, with the best-on-(noisy)-validation or the last weights.

    "2 independent" is the same 2-replica run with a burn-in past the last step: each replica trains on the
    labels alone, with its own init and data order, exactly as the codistilled pair does before burn-in.
    """
    dataset = _noisy_digits()
    cd = KEEP_CODISTILL
    arms = {"2 independent": STEPS, "codistill": cd.burn_in_steps}
    records, rows = [], []
    for keep in ("best", "last"):
        runs: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
        for seed in SEEDS:
            for arm, burn_in in arms.items():
                cfg = _config("digits", seed, 2, burn_in, cd.exchange_every, keep=keep)
                m = run_codistill(
                    cfg, dataset, out_dir=tmp / "keep", sink=ListSink(), device="cpu", export=False
                ).metrics
                runs[arm].append({
                    "seed": seed, "test_churn": m["test_churn"], "val_churn": m["churn"],
                    "test_acc": (m["replica0_test_acc"] + m["replica1_test_acc"]) / 2,
                    "ensemble_test_acc": m["ensemble_test_acc"],
                    "kept_step": (m["replica0_kept_step"] + m["replica1_kept_step"]) / 2,
                })  # fmt: skip
        ind = [r["test_churn"] for r in runs["2 independent"]]
        co = [r["test_churn"] for r in runs["codistill"]]
        change = mean_std([(c - i) / max(i, 1e-9) for c, i in zip(co, ind)])
        for arm, rs in runs.items():
            rec = {
                "keep": keep,
                "method": arm,
                "runs": rs,
                **{
                    k: mean_std([r[k] for r in rs])
                    for k in ("test_churn", "test_acc", "ensemble_test_acc", "kept_step")
                },
            }
            if arm == "codistill":
                rec["churn_change_vs_independent"] = change
            records.append(rec)
            rows.append([
                keep, arm, _pm(rec["test_churn"]), _pm(rec["test_acc"]), _pm(rec["ensemble_test_acc"]),
                f"{rec['kept_step'][0]:.0f}",
                f"{change[0] * 100:+.0f}% ± {change[1] * 100:.0f}%" if arm == "codistill" else "-",
            ])  # fmt: skip
    return records, rows


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from kd_core.codistill import FileExchange, run_codistill_group
    from kd_core.config import parse_config
    from kd_core.data import load_dataset
    from kd_core.sinks import ListSink

    torch.set_num_threads(1)
    cfg = parse_config(json.loads(sys.argv[1]))
    data = load_dataset(cfg.dataset, options=cfg.data_options, seed=0)
    g = int(sys.argv[2])
    sink = ListSink()
    run_codistill_group(cfg, data, g, FileExchange(sys.argv[3]), out_dir=sys.argv[4], sink=sink)
    print(json.dumps(sink.series(f"replica{g}/samples_per_s")))
    """
)


def _steady(series: list[tuple[int, float]]) -> float:
    values = [v for _, v in series[2:]] or [v for _, v in series]  # skip warm-up logs
    return sum(values) / len(values)


def throughput(tmp: Path) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """Samples per second per replica: alone, 2 in one loop, 2 groups in 2 processes, a 2-worker gloo group."""
    name = "synthetic-noise0.3"
    dataset = load_dataset(DATASETS[name][0], options=DATASETS[name][1], seed=0)
    out: list[dict[str, Any]] = []

    def in_process(replicas: int, label: str) -> None:
        sink = ListSink()
        cfg = _config(name, 0, replicas, BURN_IN, 10, THROUGHPUT_STEPS)
        run_codistill(cfg, dataset, out_dir=tmp / "t", sink=sink, device="cpu", export=False)
        out.append(
            {"mode": label, "processes": 1, "per_replica": _steady(sink.series("samples_per_s")) / replicas}
        )

    in_process(1, "1 replica alone (1 process)")
    in_process(2, "2 replicas, one loop (1 process)")

    cfg = _config(name, 0, 2, BURN_IN, 10, THROUGHPUT_STEPS, codistill={"placement": "workers"})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                json.dumps(cfg.to_dict()),
                str(g),
                str(tmp / "ex"),
                str(tmp / f"g{g}"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for g in range(2)
    ]
    speeds = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(stderr[-2000:])
        speeds.append(_steady(json.loads(stdout.strip().splitlines()[-1])))
    out.append(
        {"mode": "2 groups, 2 processes, file exchange", "processes": 2, "per_replica": sum(speeds) / 2}
    )

    sink = ListSink()
    cfg = _config(name, 0, 1, BURN_IN, 10, THROUGHPUT_STEPS, codistill={"group_size": 2})
    run_codistill(cfg, dataset, out_dir=tmp / "dp", sink=sink, device="cpu")
    out.append(
        {
            "mode": "1 replica = 2 gloo workers",
            "processes": 2,
            "per_replica": _steady(sink.series("replica0/samples_per_s")),
        }
    )

    alone = out[0]["per_replica"]
    rows = [
        [o["mode"], o["processes"], f"{o['per_replica']:.0f}", f"{o['per_replica'] / alone:.2f}"] for o in out
    ]
    return out, rows


def _step_times(n: int) -> dict[str, float]:
    """ms per training step of n small replicas: a Python loop vs torch.func vmap over stacked weights."""
    import copy

    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    from kd_core.models import build_model

    models = [build_model({"arch": "mlp", "hidden": [128, 128]}, (20,), 4) for _ in range(n)]
    x, y = torch.randn(n, 64, 20), torch.randint(0, 4, (n, 64))
    opts = [torch.optim.Adam(m.parameters(), 1e-3) for m in models]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    # Adam is elementwise: one optimiser over stacked weights = one per replica.
    stacked_opt = torch.optim.Adam(params.values(), 1e-3)
    base = copy.deepcopy(models[0]).to("meta")

    def loop() -> None:
        for k, m in enumerate(models):
            loss = F.cross_entropy(m(x[k]), y[k])
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()

    def one(p, b, xx, yy):
        return F.cross_entropy(functional_call(base, (p, b), (xx,)), yy)

    def batched() -> None:
        loss = vmap(one)(params, buffers, x, y).sum()
        stacked_opt.zero_grad()
        loss.backward()
        stacked_opt.step()

    times: dict[str, float] = {}
    for fn in (loop, batched, loop, batched):
        for _ in range(20):
            fn()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        times[fn.__name__] = min(times.get(fn.__name__, math.inf), (time.perf_counter() - t) / 200 * 1e3)
    return times


def batching() -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """Is batching the replicas with vmap worth it? One step of 2 and 4 replicas, both ways."""
    out = []
    for n in (2, 4):
        times = _step_times(n)
        out.append({"replicas": n, "loop_ms": times["loop"], "vmap_ms": times["batched"]})
    rows = [[o["replicas"], f"{o['loop_ms']:.2f}", f"{o['vmap_ms']:.2f}"] for o in out]
    return out, rows


def main(argv: list[str] | None = None) -> None:
    parts = list(argv) if argv else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and least disturbed by neighbours
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "settings": {"steps": STEPS, "burn_in": BURN_IN, "seeds": list(SEEDS), "datasets": DATASETS},
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "quality" in parts:
                records, rows = quality(Path(tmp))
                payload["quality"] = records
                print(
                    f"\nCodistillation, 2 replicas, MLP [128,128], {STEPS} steps, burn-in {BURN_IN}, "
                    f"seeds {list(SEEDS)} (mean±std)"
                )
                print(
                    "val loss: mean over replicas at the final step; val/test acc, ensemble, churn: each replica's "
                    "kept (best-on-validation) weights; target: the best val loss 1 replica reaches (same seed)"
                )
                print_table(
                    [
                        "dataset",
                        "method",
                        "final val loss",
                        "min val loss",
                        "val acc",
                        "test acc",
                        "ensemble val acc",
                        "ensemble test acc",
                        "churn",
                        "steps to target",
                    ],
                    rows,
                )
            if "keep" in parts:
                records, rows = keep_churn(Path(tmp))
                payload["keep"] = {"noise": KEEP_NOISE, "codistill": dataclasses.asdict(KEEP_CODISTILL),
                                   "records": records}  # fmt: skip
                cd = KEEP_CODISTILL
                print(
                    f"\nTest churn of 2 replicas, digits with {KEEP_NOISE:.0%} of train and val labels wrong, MLP "
                    f"[128,128], {STEPS} steps, burn-in {cd.burn_in_steps}, exchange every {cd.exchange_every}, "
                    f"seeds {list(SEEDS)} (mean±std); change: codistilled vs independent churn, paired by seed"
                )
                print_table(
                    ["keep", "method", "test churn", "test acc", "ensemble test acc", "kept step", "change"],
                    rows,
                )
            if "throughput" in parts:
                payload["throughput"], speed_rows = throughput(Path(tmp))
                print(
                    f"\nThroughput, samples/s per replica ({THROUGHPUT_STEPS} steps, 1 thread per process, 2-core CPU)"
                )
                print_table(["mode", "processes", "samples/s per replica", "vs alone"], speed_rows)
            if "batching" in parts:
                payload["loop_vs_vmap"], batch_rows = batching()
                print("\nOne step of N replicas (MLP [128,128], batch 64, Adam, 1 thread): ms per step")
                print_table(["replicas", "python loop", "vmap (torch.func)"], batch_rows)
    finally:
        torch.set_num_threads(threads)
    payload["wall_s"] = time.perf_counter() - started
    # A partial run gets a file of its own, so it never replaces the full run's.
    name = (
        "codistill" if set(parts) == set(PARTS) else "codistill_" + "_".join(p for p in PARTS if p in parts)
    )
    path = write_result(name, payload)
    print(f"\nwrote {path} in {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
