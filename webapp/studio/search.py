"""Searches, the web side: validate and create a search, show it (trials, Pareto front, best), cancel it, and
send its live messages. The search advances on the workers (task `workers.advance_search`, queue `default`):
this module only enqueues that task by name, it never asks Optuna for trials itself.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from kd_core.config import parse_config
from kd_core.errors import ConfigError
from kd_core.limits import name_problem
from kd_core.search import Budget, pareto_front, parse_budget, parse_space, trial_choice
from webapp.celery import app as celery_app
from webapp.studio import services
from webapp.studio.auth import ApiError
from webapp.studio.search_models import Search, SearchTrial

log = logging.getLogger(__name__)

ADVANCE_TASK = "workers.advance_search"
MAX_TRIALS = 500
MAX_EPOCHS = 1000
# DKD's warm-up as a share of training: the paper's 20 of 240 epochs (kd_core.config.METHOD_OPTIONS says 20).
DKD_WARMUP_SHARE = 20 / 240
# Fields of the experiment config a search request may set for every trial (the rest the search chooses).
BASE_FIELDS = {
    "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "seed", "soft_loss", "augment",
    "val_fraction", "test_fraction", "log_every", "time_limit_s",
}  # fmt: skip
REQUEST_FIELDS = {
    "name", "dataset", "teacher", "budget", "space", "trials", "parallel", "epochs", "objective", "seed",
    "pruning", "config",
}  # fmt: skip


# --- create ---------------------------------------------------------------------------------------------------


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ApiError(
            f"'{key}' must be an integer from {lo} to {hi}; got {value!r}", fields={key: "out of range"}
        )
    return value


def create_search(owner: Any, body: dict[str, Any]) -> Search:
    """Validate a search request (400 naming the bad part), save it queued and enqueue its first advance."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise ApiError(f"unknown search field(s): {', '.join(unknown)}")
    name = body.get("name", "")
    if not isinstance(name, str) or (problem := name_problem(name, "'name'")):
        raise ApiError(problem if isinstance(name, str) else "'name' must be a string")
    if "dataset" not in body:
        raise ApiError(
            "'dataset' is required: the id of one of your datasets or a built-in name such as \"digits\""
        )
    if body.get("teacher") is None:
        raise ApiError("'teacher' is required: a search distils from one of your checkpoints")
    if body.get("objective", "val_acc") != "val_acc":
        raise ApiError(
            "'objective' must be \"val_acc\" (accuracy on the validation split; test is never used)"
        )
    dataset = services._own_dataset(owner, body["dataset"])
    teacher = services._own_teacher(owner, body["teacher"])
    services._check_teacher_fits(teacher, dataset)
    if not dataset.input_shape or not dataset.num_classes:
        raise ApiError(
            f"dataset {dataset.pk} has no labelled classes: a search needs a labelled validation split"
        )
    try:
        budget = parse_budget(body.get("budget"))
        space = parse_space(body.get("space"), tuple(dataset.input_shape), int(dataset.num_classes), budget)
    except ConfigError as exc:
        raise ApiError(str(exc)) from None
    trials = _int(body, "trials", 16, 1, MAX_TRIALS)
    parallel = _int(body, "parallel", 2, 1, max(1, min(16, int(settings.KD_MAX_ACTIVE_JOBS))))
    epochs = _int(body, "epochs", 10, 1, MAX_EPOCHS)
    seed = _int(body, "seed", 0, 0, 2**31 - 1)
    pruning = body.get("pruning", True)
    if not isinstance(pruning, bool):
        raise ApiError("'pruning' must be true or false")
    base = body.get("config", {})
    if not isinstance(base, dict) or set(base) - BASE_FIELDS:
        extra = sorted(set(base) - BASE_FIELDS) if isinstance(base, dict) else []
        raise ApiError(
            f"'config' may set only {', '.join(sorted(BASE_FIELDS))}"
            + (f"; not {', '.join(extra)}" if extra else "")
        )
    for method in space.methods:  # every trial's config must parse: check each method with the first student
        try:
            parse_config(trial_config(
                base, dataset.pk, teacher.pk, epochs, space.students[0], 4.0, 0.9, name or "search",
                method=method, logit_standardization=trial_choice(method, max(space.standardize)),
            ))  # fmt: skip
        except ConfigError as exc:
            where = f" with method {method}" if len(space.methods) > 1 or method != "hinton" else ""
            raise ApiError(f"'config'{where}: {exc}") from None
    with transaction.atomic():
        search = Search.objects.create(
            owner=owner, name=name or f"search-{dataset.name}", dataset=dataset, teacher=teacher,
            budget=budget.to_dict(), space=space.to_dict(), trials=trials, parallel=parallel, epochs=epochs,
            base_config=base, seed=seed, pruning=pruning,
        )  # fmt: skip
        enqueue_advance(search.pk)
    return search


def trial_config(
    base: dict[str, Any], dataset_id: int, teacher_id: int, epochs: int, student: dict[str, Any],
    temperature: float, alpha: float, name: str, *, method: str = "hinton", logit_standardization: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The experiment config of one trial: the request's shared fields plus what the search chose.

    Each method runs with its paper's options (kd_core.config.METHOD_OPTIONS), except DKD's warm-up, which is
    the paper's share of training (20 of 240 epochs) of the trial's epochs: a short trial would otherwise end
    before DKD's term reached its full weight. `alpha` matters to hinton only (dkd and dist weigh their terms
    with their own options).
    """
    config = {
        **base, "kind": "distill", "name": name, "dataset": dataset_id, "teacher": teacher_id, "model": student,
        "epochs": epochs, "temperature": temperature, "alpha": alpha, "method": method,
        "logit_standardization": bool(logit_standardization),
    }  # fmt: skip
    if method == "dkd":
        config["method_options"] = {"warmup_epochs": round(epochs * DKD_WARMUP_SHARE, 4)}
    return config


def enqueue_advance(search_id: int, countdown: float = 0.0) -> None:
    """Send `workers.advance_search` (queue `default`) once the surrounding transaction commits."""

    def send() -> None:
        try:
            celery_app.send_task(
                ADVANCE_TASK, args=[search_id], queue="default", countdown=countdown or None,
                retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a down broker fails the search, not the request
            log.exception("could not enqueue search %s", search_id)
            Search.objects.filter(pk=search_id, status__in=Search.ACTIVE).update(
                status=Search.FAILED, error=f"could not reach the job queue: {exc}", finished=timezone.now()
            )

    transaction.on_commit(send)


# --- cancel ---------------------------------------------------------------------------------------------------


def cancel_search(search: Search) -> Search:
    """Stop the search: no more trials; queued trials cancelled now, running ones asked to stop. 409 if finished."""
    updated = Search.objects.filter(pk=search.pk, status__in=Search.ACTIVE).update(
        status=Search.CANCELLED, cancel_requested=True, finished=timezone.now()
    )
    search.refresh_from_db()
    if not updated:
        raise ApiError(f"search {search.pk} already {search.status}; there is nothing to cancel", 409)
    for trial in search.trial_rows.filter(state__in=SearchTrial.ACTIVE).select_related("experiment"):
        if trial.experiment is not None and trial.experiment.is_active:
            try:
                services.cancel_experiment(trial.experiment)
            except ApiError:
                pass  # it finished meanwhile; the worker settles the trial
    send(search.pk, [status_message(search)])
    return search


# --- show ---------------------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def trial_json(t: SearchTrial, exported: bool | None = None) -> dict[str, Any]:
    """One trial; `exported` (detail only): its experiment has a model to download. Only a trial on the front
    when it finished exports; the others' weights are not kept (workers/search.py `after_run`)."""
    out = {
        "number": t.number,
        "experiment": t.experiment_id,
        "state": t.state,
        "params": t.params,
        "figures": t.figures,
        "metrics": {k: _finite(v) for k, v in (t.metrics or {}).items()},
        "reason": t.reason or None,
    }
    if exported is not None:
        out["exported"] = exported
    return out


def exported_experiments(trials: list[SearchTrial]) -> set[int]:
    """Experiment ids among `trials` that have the experiment's model (a safetensors artifact) to download."""
    from webapp.studio.models import Artifact

    ids = [t.experiment_id for t in trials if t.experiment_id]
    if not ids:
        return set()
    rows = Artifact.objects.filter(experiment_id__in=ids, kind="safetensors", replica__isnull=True)
    return set(rows.values_list("experiment_id", flat=True))


def cost_of(budget: dict[str, Any], t: SearchTrial) -> float | None:
    value = (t.figures or {}).get(Budget(**budget).cost)
    return float(value) if isinstance(value, int | float) else None


def front_and_best(search: Search, trials: list[SearchTrial]) -> tuple[list[int], int | None]:
    """Experiment ids on the accuracy/cost front of the complete trials (best first), and the most accurate
    trial inside the budget (every complete trial is inside it: over-budget students are never trained)."""
    points = []
    for t in trials:
        acc, cost = (t.metrics or {}).get("val_acc"), cost_of(search.budget, t)
        if (
            t.state == SearchTrial.COMPLETE
            and t.experiment_id
            and isinstance(acc, int | float)
            and cost is not None
        ):
            points.append((t.experiment_id, float(acc), cost))
    front = pareto_front(points)
    return front, (front[0] if front else None)


def best_figures(trials: list[SearchTrial], best: int | None) -> dict[str, Any]:
    """The best trial's accuracies for a list entry (`best_val_acc`, `best_test_acc`; None before one)."""
    trial = next((t for t in trials if best is not None and t.experiment_id == best), None)
    metrics = (trial.metrics or {}) if trial is not None else {}
    return {
        "best_val_acc": _finite(metrics.get("val_acc")),
        "best_test_acc": _finite(metrics.get("test_acc")),
    }


def search_json(search: Search, detail: bool = False) -> dict[str, Any]:
    trials = list(search.trial_rows.all())
    front, best = front_and_best(search, trials)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    out: dict[str, Any] = {
        "id": search.pk,
        "name": search.name,
        "status": search.status,
        "progress": search.progress,
        "error": search.error,
        "dataset": {"id": search.dataset_id, "name": search.dataset.name} if search.dataset else None,
        "teacher": {"id": search.teacher_id, "name": search.teacher.name} if search.teacher else None,
        "budget": search.budget,
        "cost": Budget(**search.budget).cost,
        "trials_total": search.trials,
        "parallel": search.parallel,
        "epochs": search.epochs,
        "counts": counts,
        "pareto": front,
        "best": best,
        **best_figures(trials, best),
        "created": search.created.isoformat() if search.created else None,
        "started": search.started.isoformat() if search.started else None,
        "finished": search.finished.isoformat() if search.finished else None,
    }
    if detail:
        out["space"] = search.space
        out["config"] = search.base_config
        out["seed"] = search.seed
        out["pruning"] = search.pruning
        exported = exported_experiments(trials)
        out["trials"] = [trial_json(t, t.experiment_id in exported) for t in trials]
        out["trial_epochs"] = sum(int((t.metrics or {}).get("epochs_run") or 0) for t in trials)
    return out


# --- live messages --------------------------------------------------------------------------------------------


def group_name(search_id: int) -> str:
    return f"search-{int(search_id)}"


def status_message(search: Search) -> dict[str, Any]:
    return {
        "type": "status",
        "status": search.status,
        "progress": search.progress,
        "error": search.error or None,
    }


def trial_message(trial: SearchTrial) -> dict[str, Any]:
    return {"type": "trial", **trial_json(trial)}


def send(search_id: int, messages: list[dict[str, Any]]) -> None:
    """Best effort, like webapp/studio/live.py: the rows are the record, the page refills from the REST API."""
    if not messages:
        return
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    group = group_name(search_id)

    async def send_all() -> None:
        for message in messages:
            await layer.group_send(group, {"type": "search.message", "message": message})

    try:
        async_to_sync(send_all)()
    except Exception:  # noqa: BLE001
        log.warning("could not send %d message(s) to %s", len(messages), group, exc_info=True)
