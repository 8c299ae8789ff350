"""Distill to a budget on digits: does the search beat the default distillation config that fits 5,000 parameters,
at what cost in trial-epochs, and how much does pruning save?

The search here is the one the workers run, in one process: the same space ("auto" students under the
budget, T in [1, 8], alpha in [0.3, 0.95]), the same two Optuna studies (multi-objective TPE for the sampler,
a single-objective twin with SuccessiveHalvingPruner(min_resource=1, reduction_factor=3) for pruning,
settings from webapp/studio/search_study.py), `parallel` 1, in-memory storage instead of the database, and
kd_core.runner.run_experiment for each trial (teacher logits cached on disk, no exports). Scores are on the
test split; the search chooses by validation accuracy only.

    python -m bench.bench_search [--trials 16] [--epochs 15] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import mean_std, print_table, write_result

BUDGET = {"max_params": 5000}


class Sink:
    """Reports each whole epoch's val_acc to the pruning twin; `pruned` becomes the stop signal."""

    def __init__(self, twin: Any) -> None:
        self.twin, self.pruned, self.epochs = twin, False, 0

    def log(self, step: int, values: dict[str, float]) -> None:
        acc, epoch = values.get("val/acc"), values.get("epoch")
        if acc is None or epoch is None or abs(epoch - round(epoch)) > 1e-6 or self.pruned:
            return
        self.epochs = round(epoch)
        self.twin.report(float(acc), self.epochs)
        self.pruned = self.twin.should_prune()

    def status(self, progress: float, eta_s: float | None) -> None:
        pass


def teacher_file(workdir: Path, epochs: int) -> tuple[Path, dict[str, Any]]:
    from kd_core.config import parse_config
    from kd_core.runner import load_experiment_dataset, run_experiment
    from kd_core.sinks import ListSink

    config = parse_config({"kind": "train", "dataset": "digits", "model": {"arch": "cnn", "channels": [16, 32]},
                           "epochs": epochs, "seed": 0})  # fmt: skip
    result = run_experiment(config, dataset=load_experiment_dataset(config), out_dir=workdir / "teacher",
                            sink=ListSink(), device="cpu")  # fmt: skip
    print(
        f"teacher: cnn [16, 32], test acc {result.metrics['test_acc']:.4f}, {result.metrics['student_params']} params"
    )
    return Path(result.files["safetensors"]), result.metrics


def distill(values: dict[str, Any], teacher: Any, dataset: Any, out: Path, cache: Path, sink: Any = None,
            stop: Any = None) -> dict[str, Any]:  # fmt: skip
    from kd_core.config import parse_config
    from kd_core.runner import run_experiment
    from kd_core.sinks import ListSink

    config = parse_config({"kind": "distill", "dataset": "digits", "teacher": "teacher", **values})
    result = run_experiment(
        config, dataset=dataset, teacher=teacher, out_dir=out, sink=sink or ListSink(),
        should_stop=stop or (lambda: False), device="cpu", cache_dir=cache, export=False,
    )  # fmt: skip
    return result.metrics


def run_search(
    seed: int, trials: int, epochs: int, pruning: bool, teacher: Any, dataset: Any, work: Path
) -> dict:
    import optuna

    from kd_core.search import pareto_front, parse_budget, parse_space, student_figures

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = parse_budget(BUDGET)
    space = parse_space({"students": "auto"}, tuple(dataset.input_shape), int(dataset.num_classes), budget)
    startup = min(10, max(4, trials // 3))
    main = optuna.create_study(directions=["maximize", "minimize"],
                               sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup))  # fmt: skip
    pruner = (
        optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
        if pruning
        else optuna.pruners.NopPruner()
    )
    twin_study = optuna.create_study(direction="maximize", pruner=pruner)
    dists = {
        "student": optuna.distributions.CategoricalDistribution(list(range(len(space.students)))),
        "temperature": optuna.distributions.FloatDistribution(*space.temperature),
        "alpha": optuna.distributions.FloatDistribution(*space.alpha),
    }
    rows, trial_epochs, fixed = [], 0, []
    for _ in range(trials):
        trial, twin = main.ask(dists), twin_study.ask()
        spec = space.students[trial.params["student"]]
        params = student_figures(spec, tuple(dataset.input_shape), int(dataset.num_classes))["params"]
        sink = Sink(twin)
        t0 = time.perf_counter()
        metrics = distill({"model": spec, "epochs": epochs, "temperature": trial.params["temperature"],
                           "alpha": trial.params["alpha"], "seed": seed}, teacher, dataset,
                          work / f"s{seed}-{trial.number}", work / "cache", sink, lambda s=sink: s.pruned)  # fmt: skip
        wall = time.perf_counter() - t0
        fixed.append(wall - metrics["train_time_s"])
        trial_epochs += sink.epochs
        state = "pruned" if sink.pruned else "complete"
        if sink.pruned:
            main.tell(trial, state=optuna.trial.TrialState.PRUNED)
            twin_study.tell(twin, state=optuna.trial.TrialState.PRUNED)
        else:
            main.tell(trial, [metrics["val_acc"], params])
            twin_study.tell(twin, metrics["val_acc"])
        rows.append({"number": trial.number, "student": spec, "params": params, "state": state, "epochs": sink.epochs,
                     "temperature": trial.params["temperature"], "alpha": trial.params["alpha"],
                     "val_acc": metrics["val_acc"], "test_acc": metrics["test_acc"]})  # fmt: skip
    complete = [r for r in rows if r["state"] == "complete"]
    front = pareto_front([(r["number"], r["val_acc"], r["params"]) for r in complete])
    by_number = {r["number"]: r for r in rows}
    for a in front:  # no point on the reported front is dominated by any trial
        ra = by_number[a]
        assert not any(r["val_acc"] >= ra["val_acc"] and r["params"] <= ra["params"]
                       and (r["val_acc"] > ra["val_acc"] or r["params"] < ra["params"]) for r in complete)  # fmt: skip
    best = by_number[front[0]]
    return {"seed": seed, "pruning": pruning, "trial_epochs": trial_epochs, "best": best, "front": front,
            "trials": rows, "fixed_cost_per_trial_s": sum(fixed) / len(fixed)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-epochs", type=int, default=20)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from kd_core.checkpoints import load_teacher
    from kd_core.config import ExperimentConfig, parse_config
    from kd_core.runner import load_experiment_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    path, teacher_metrics = teacher_file(work, args.teacher_epochs)
    dataset = load_experiment_dataset(parse_config({"dataset": "digits"}))
    teacher = load_teacher(str(path), input_shape=tuple(dataset.input_shape), num_classes=dataset.num_classes)

    default = ExperimentConfig()  # mlp [64] (4,810 parameters: fits 5,000), T 4, alpha 0.9
    baseline = []
    for seed in args.seeds:
        m = distill({"model": default.model, "epochs": args.epochs, "temperature": default.temperature,
                     "alpha": default.alpha, "seed": seed}, teacher, dataset, work / f"base{seed}", work / "cache")  # fmt: skip
        baseline.append(m["test_acc"])
    base_params = m["student_params"]

    searches = [run_search(s, args.trials, args.epochs, True, teacher, dataset, work) for s in args.seeds]
    unpruned = run_search(args.seeds[0], args.trials, args.epochs, False, teacher, dataset, work)

    search_acc = [s["best"]["test_acc"] for s in searches]
    (bm, bs), (sm, ss) = mean_std(baseline), mean_std(search_acc)
    pruned_epochs = [s["trial_epochs"] for s in searches]
    ratio = searches[0]["trial_epochs"] / max(unpruned["trial_epochs"], 1)
    rows = [["default config (mlp [64], T 4, alpha 0.9)", base_params, bm, bs, args.epochs * len(args.seeds)]]
    for s in searches:
        b = s["best"]
        rows.append([f"search seed {s['seed']}: {b['student']} T {b['temperature']:.2f} a {b['alpha']:.2f}",
                     b["params"], b["test_acc"], 0.0, s["trial_epochs"]])  # fmt: skip
    rows.append([f"search seed {unpruned['seed']} without pruning", unpruned["best"]["params"],
                 unpruned["best"]["test_acc"], 0.0, unpruned["trial_epochs"]])  # fmt: skip
    print_table(["run", "params", "test acc", "std", "trial-epochs"], rows)
    print(f"search best (mean of {len(searches)} seeds) {sm:.4f} ± {ss:.4f} vs default {bm:.4f} ± {bs:.4f}: "
          f"{(sm - bm) * 100:+.2f} points for {sum(pruned_epochs) / len(pruned_epochs):.0f} trial-epochs per search")  # fmt: skip
    print(f"pruning: {searches[0]['trial_epochs']} vs {unpruned['trial_epochs']} trial-epochs unpruned "
          f"({ratio:.0%}; target <= 50%); fixed cost per trial {searches[0]['fixed_cost_per_trial_s']:.2f} s")  # fmt: skip
    path = write_result("search", {
        "budget": BUDGET, "trials": args.trials, "epochs": args.epochs, "seeds": args.seeds,
        "teacher": {"spec": {"arch": "cnn", "channels": [16, 32]}, "test_acc": teacher_metrics["test_acc"]},
        "default": {"test_acc": baseline, "mean": bm, "params": base_params},
        "search": {"best_test_acc": search_acc, "mean": sm, "gain_points": (sm - bm) * 100,
                   "trial_epochs": pruned_epochs},
        "pruning": {"pruned_trial_epochs": searches[0]["trial_epochs"],
                    "unpruned_trial_epochs": unpruned["trial_epochs"], "ratio": ratio},
        "fixed_cost_per_trial_s": [s["fixed_cost_per_trial_s"] for s in searches],
        "runs": searches + [unpruned],
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
