"""A search's Optuna studies in the project's database (Optuna's RDB storage): the sampler's and the pruner's.

Two studies per search, both in Django's database through an SQLAlchemy URL built from DATABASES, so a
search survives restarts of the web process and of every worker:
- `kd-search-<id>`: multi-objective (maximise validation accuracy, minimise latency, size or parameters as
  the budget says), sampled by TPE. It is told each trial's outcome: values when complete, PRUNED or FAIL.
- `kd-search-<id>-prune`: single-objective (maximise validation accuracy) with Optuna's
  SuccessiveHalvingPruner. Optuna's pruners do not support multi-objective studies, so each trial has a twin
  here to which its job reports val_acc per epoch; the twin's `should_prune()` (asynchronous successive
  halving against the twins that reached the same epoch) stops the job.
Samplers are not stored by Optuna; each load builds TPE with a seed that also counts the trials already
asked, so two loads never replay the same random start-up sample.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from django.db import connection

log = logging.getLogger(__name__)

PRUNE_REDUCTION_FACTOR = 3


def storage_url() -> str:
    """Django's default database (the test database under tests) as an SQLAlchemy URL."""
    from sqlalchemy.engine import URL

    s = connection.settings_dict
    engine = s["ENGINE"]
    if engine.endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    if "postgresql" in engine:
        url = URL.create(
            "postgresql+psycopg",
            username=s.get("USER") or None,
            password=s.get("PASSWORD") or None,
            host=s.get("HOST") or None,
            port=int(s["PORT"]) if s.get("PORT") else None,
            database=s.get("NAME") or None,
        )
        return url.render_as_string(hide_password=False)
    raise RuntimeError(f"searches need SQLite or PostgreSQL; the database engine is {engine}")


@functools.cache
def _storage_for(url: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # The web process and the workers share the file: wait for locks as Django does.
        kwargs["connect_args"] = {"timeout": 30}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def storage() -> Any:
    return _storage_for(storage_url())


def directions() -> list[str]:
    return ["maximize", "minimize"]


def main_study(search: Any, asked: int = 0) -> Any:
    """The search's multi-objective study (created on first use)."""
    import optuna

    startup = min(10, max(4, search.trials // 3))
    sampler = optuna.samplers.TPESampler(
        seed=(search.seed * 100_003 + asked) % 2**31, n_startup_trials=startup
    )
    return optuna.create_study(
        study_name=search.study_name, storage=storage(), directions=directions(), sampler=sampler,
        load_if_exists=True,
    )  # fmt: skip


def prune_study(search: Any) -> Any:
    """The pruning twin study (single objective, successive halving)."""
    import optuna

    pruner = (
        optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=PRUNE_REDUCTION_FACTOR)
        if search.pruning
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        study_name=f"{search.study_name}-prune", storage=storage(), direction="maximize", pruner=pruner,
        load_if_exists=True,
    )  # fmt: skip


def distributions(space: dict[str, Any]) -> dict[str, Any]:
    """Optuna distributions of a stored space: the student by index into the space's list."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out: dict[str, Any] = {"student": CategoricalDistribution(list(range(len(space["students"]))))}
    for key in ("temperature", "alpha"):
        lo, hi = space[key]
        if hi > lo:
            out[key] = FloatDistribution(lo, hi)
    if len(space["method"]) > 1:
        out["method"] = CategoricalDistribution(list(space["method"]))
    if len(standardize_choices(space)) > 1:
        out["logit_standardization"] = CategoricalDistribution([False, True])
    return out


def standardize_choices(space: dict[str, Any]) -> list[bool]:
    """The space's logit_standardization choices ([False] for searches stored before it existed)."""
    return [bool(v) for v in space.get("logit_standardization", [False])]


def ask(search: Any, asked: int) -> tuple[int, int, dict[str, Any]]:
    """A new trial: (its number, its pruning twin's number, params with the student spec resolved).

    `logit_standardization` in the params is what the trial runs with: a dist trial never standardises
    (kd_core.search.trial_choice), whatever the sampler drew for it."""
    from kd_core.search import trial_choice

    study = main_study(search, asked)
    trial = study.ask(distributions(search.space))
    twin = prune_study(search).ask()
    space = search.space
    params = {
        "student": space["students"][int(trial.params["student"])],
        "temperature": round(float(trial.params.get("temperature", space["temperature"][0])), 4),
        "alpha": round(float(trial.params.get("alpha", space["alpha"][0])), 4),
        "method": trial.params.get("method", space["method"][0]),
    }
    params["logit_standardization"] = trial_choice(
        params["method"], trial.params.get("logit_standardization", standardize_choices(space)[0])
    )
    return trial.number, twin.number, params


def _trial_id(study: Any, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def report(search: Any, prune_number: int, value: float, epoch: int) -> bool:
    """Report val_acc at `epoch` to the trial's twin; True when the pruner says stop."""
    import optuna

    study = prune_study(search)
    trial = optuna.trial.Trial(study, _trial_id(study, prune_number))
    trial.report(float(value), int(epoch))
    return bool(trial.should_prune())


def tell(
    search: Any, number: int, prune_number: int | None, state: str, values: tuple[float, float] | None
) -> None:
    """Record a trial's outcome in both studies (again is harmless): complete with values, pruned or failed."""
    from optuna.trial import TrialState

    main = main_study(search)
    twin = prune_study(search) if prune_number is not None else None
    if state == "complete" and values is not None:
        main.tell(number, list(values), skip_if_finished=True)
        if twin is not None:
            twin.tell(prune_number, values[0], skip_if_finished=True)
        return
    optuna_state = TrialState.PRUNED if state == "pruned" else TrialState.FAIL
    main.tell(number, state=optuna_state, skip_if_finished=True)
    if twin is not None:
        twin.tell(prune_number, state=optuna_state, skip_if_finished=True)
