"""Searches on the workers: advance a search (ask Optuna for trials, check each student against the budget,
queue the trials as distill jobs) and the hooks the job handler calls for a job that is a search trial.

- `advance(search_id)` (task `workers.advance_search`, queue `default`): one at a time per search (a claimed
  `advance_until`); settles trials whose experiment ended, asks the study for new trials until `parallel` are
  active or `trials` were trained. A student over the budget is never trained: its parameters and size come
  from the spec, its latency is measured here on the budget's device (once per architecture, input shape
  and device: StudentLatency), and the trial is recorded `over_budget` with the figure.
- `wrap(exp, sink, stop)`: the trial's metrics sink reports each epoch's val_acc to its pruning twin
  (webapp/studio/search_study.py) and the stop signal stops the job once the pruner says so (`pruned`).
- `run_options(exp)`, `after_run(...)`: a trial exports only when it lands on the front (or is the best).
- `after_job(experiment_id)`: after any delivery of a trial's job, settle the trial and advance the search.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import socket
from pathlib import Path
from typing import Any

from django.db import close_old_connections, transaction
from django.utils import timezone

log = logging.getLogger(__name__)

ADVANCE_LOCK_S = 120
# Asking stops after this many times `trials` (students over the budget are cheap but must not loop forever).
ASK_FACTOR = 4


# --- advancing ------------------------------------------------------------------------------------------------


def _claim(search_id: int) -> bool:
    from django.db.models import Q

    from webapp.studio.search_models import Search

    now = timezone.now()
    free = Q(advance_until__isnull=True) | Q(advance_until__lt=now)
    until = now + datetime.timedelta(seconds=ADVANCE_LOCK_S)
    return bool(Search.objects.filter(free, pk=search_id).update(advance_until=until))


def _release(search_id: int) -> None:
    from webapp.studio.search_models import Search

    Search.objects.filter(pk=search_id).update(advance_until=None)


def advance(search_id: int) -> str:
    """Settle finished trials, queue new ones, finish the search when all are done; returns what happened."""
    from webapp.studio.search import enqueue_advance
    from webapp.studio.search_models import Search

    close_old_connections()
    if not Search.objects.filter(pk=search_id).exists():
        return "missing"
    if not _claim(search_id):
        enqueue_advance(search_id, countdown=2.0)  # the holder may have counted before our trial ended
        return "busy: retried in 2 s"
    try:
        return _advance(search_id)
    except Exception as exc:
        log.exception("search %s could not advance", search_id)
        _finish(search_id, Search.FAILED, error=f"the search could not continue: {exc}")
        return "failed"
    finally:
        _release(search_id)
        close_old_connections()


def _advance(search_id: int) -> str:
    from kd_core.search import Budget
    from webapp.studio import search as searches
    from webapp.studio.search_models import Search, SearchTrial

    search = Search.objects.select_related("dataset", "teacher").get(pk=search_id)
    for trial in search.trial_rows.filter(state__in=SearchTrial.ACTIVE).select_related("experiment"):
        settle(trial, search)
    if search.status in Search.FINISHED:
        return f"settled: search {search.status}"
    if search.dataset is None or search.teacher is None:
        _finish(search.pk, Search.FAILED, error="the search's dataset or teacher was deleted")
        return "failed"
    if Search.objects.filter(pk=search.pk, status=Search.QUEUED).update(
        status=Search.RUNNING, started=timezone.now()
    ):
        search.refresh_from_db()
        searches.send(search.pk, [searches.status_message(search)])
    budget = Budget(**search.budget)
    rows = list(search.trial_rows.all())
    asked = len(rows)
    trained = sum(1 for t in rows if t.state != SearchTrial.OVER_BUDGET)
    active = sum(1 for t in rows if t.state in SearchTrial.ACTIVE)
    cap = search.trials * ASK_FACTOR
    queued = 0
    while active < search.parallel and trained < search.trials and asked < cap:
        search.refresh_from_db(fields=["status", "cancel_requested"])
        if search.status in Search.FINISHED:
            break
        trial = _new_trial(search, budget, asked)
        asked += 1
        if trial.state != SearchTrial.OVER_BUDGET:
            active, trained, queued = active + 1, trained + 1, queued + 1
    _update_progress(search)
    if active == 0 and (trained >= search.trials or asked >= cap):
        done = search.trial_rows.filter(state=SearchTrial.COMPLETE).exists()
        if done:
            _finish(search.pk, Search.SUCCEEDED, progress=1.0)
        else:
            _finish(search.pk, Search.FAILED, error="no trial completed: see each trial's reason")
        return "finished"
    return f"queued {queued} trial(s); {active} active"


def _new_trial(search: Any, budget: Any, asked: int) -> Any:
    """Ask the study for a trial; record it over_budget, or create and queue its experiment."""
    from kd_core.errors import KDError
    from webapp.studio import search as searches
    from webapp.studio import search_study
    from webapp.studio.models import Experiment
    from webapp.studio.search_models import SearchTrial
    from webapp.studio.services import enqueue_experiment

    number, twin, params = search_study.ask(search, asked)
    try:
        figures, excess = check_budget(search, params["student"], budget)
    except KDError as exc:
        figures, excess = {}, None
        trial = SearchTrial.objects.create(
            search=search, number=number, prune_number=twin, params=params, state=SearchTrial.FAILED,
            reason=str(exc), finished=timezone.now(),
        )  # fmt: skip
        search_study.tell(search, number, twin, "failed", None)
        searches.send(search.pk, [searches.trial_message(trial)])
        return trial
    if excess:
        trial = SearchTrial.objects.create(
            search=search, number=number, prune_number=twin, params=params, figures=figures,
            state=SearchTrial.OVER_BUDGET, reason=excess, finished=timezone.now(),
        )  # fmt: skip
        search_study.tell(search, number, twin, "over_budget", None)
        searches.send(search.pk, [searches.trial_message(trial)])
        return trial
    name = f"{search.name} #{number}"[:200]
    config = searches.trial_config(
        search.base_config, search.dataset_id, search.teacher_id, search.epochs, params["student"],
        params["temperature"], params["alpha"], name, method=params.get("method", "hinton"),
        logit_standardization=bool(params.get("logit_standardization", False)),
    )  # fmt: skip
    from kd_core.config import parse_config

    config = parse_config(config).to_dict()
    with transaction.atomic():
        exp = Experiment.objects.create(
            owner_id=search.owner_id, name=name, kind="distill", config=config, dataset_id=search.dataset_id,
            teacher_id=search.teacher_id, sweep_group=f"search-{search.pk}",
        )  # fmt: skip
        trial = SearchTrial.objects.create(
            search=search, number=number, prune_number=twin, params=params, figures=figures, experiment=exp
        )
        enqueue_experiment(exp)  # on commit: the worker must find both rows
    searches.send(search.pk, [searches.trial_message(trial)])
    return trial


def check_budget(search: Any, spec: dict[str, Any], budget: Any) -> tuple[dict[str, Any], str | None]:
    """The student's figures (params, size_bytes, latency_ms) and why it breaks the budget (None: it fits).

    Parameters and size come from the spec; latency is measured on this worker on the budget's device when
    the budget bounds it or the device is here, once per architecture and input shape (cached in the database).
    """
    import torch

    from kd_core.search import latency_excess, static_excess, student_figures

    shape, classes = tuple(search.dataset.input_shape), int(search.dataset.num_classes)
    figures: dict[str, Any] = student_figures(spec, shape, classes)
    excess = static_excess(figures, budget)
    if excess:
        return figures, excess
    if budget.max_latency_ms is not None or budget.device == "cpu" or torch.cuda.is_available():
        figures["latency_ms"] = round(cached_latency(spec, shape, classes, budget.device), 5)
        return figures, latency_excess(figures["latency_ms"], budget)
    return figures, None


def cached_latency(spec: dict[str, Any], shape: tuple[int, ...], classes: int, device: str) -> float:
    """Milliseconds per sample, measured once per (architecture, input shape, classes, device type)."""
    from kd_core.search import latency_key, measure_latency
    from webapp.studio.search_models import StudentLatency

    key = latency_key(spec, shape, classes, device)
    digest = hashlib.sha256(key.encode()).hexdigest()
    row = StudentLatency.objects.filter(key_hash=digest).first()
    if row is not None:
        return row.latency_ms
    ms = measure_latency(spec, shape, classes, device)
    StudentLatency.objects.get_or_create(
        key_hash=digest, defaults={"key": key, "latency_ms": ms, "worker": socket.gethostname()[:200]}
    )
    return ms


def _update_progress(search: Any) -> None:
    from webapp.studio import search as searches
    from webapp.studio.search_models import Search, SearchTrial

    done = search.trial_rows.exclude(state__in=(*SearchTrial.ACTIVE, SearchTrial.OVER_BUDGET)).count()
    progress = min(1.0, done / max(search.trials, 1))
    if Search.objects.filter(pk=search.pk, status__in=Search.ACTIVE).update(progress=progress):
        search.refresh_from_db()
        searches.send(search.pk, [searches.status_message(search)])


def _finish(search_id: int, status: str, **fields: Any) -> bool:
    from webapp.studio import search as searches
    from webapp.studio.search_models import Search

    updated = Search.objects.filter(pk=search_id, status__in=Search.ACTIVE).update(
        status=status, finished=timezone.now(), **fields
    )
    search = Search.objects.filter(pk=search_id).first()
    if updated and search is not None:
        searches.send(search_id, [searches.status_message(search)])
    return bool(updated)


# --- settling a trial -----------------------------------------------------------------------------------------


def settle(trial: Any, search: Any) -> bool:
    """Record the outcome of a trial whose experiment ended (once) and tell both studies."""
    from webapp.studio import search as searches
    from webapp.studio import search_study
    from webapp.studio.models import Experiment
    from webapp.studio.search_models import SearchTrial

    exp = Experiment.objects.filter(pk=trial.experiment_id).first() if trial.experiment_id else None
    if exp is not None and exp.status not in Experiment.FINISHED:
        return False
    m = (exp.metrics or {}) if exp is not None else {}
    metrics = {
        k: m.get(k)
        for k in ("val_acc", "test_acc", "val_agreement", "best_epoch", "student_params", "train_time_s")
        if m.get(k) is not None
    }
    metrics["epochs_run"] = m.get("epochs") or (trial.metrics or {}).get("epoch") or 0
    reason = ""
    if exp is None:
        state, reason = SearchTrial.FAILED, "its experiment was deleted"
    elif exp.status == Experiment.SUCCEEDED and m.get("stopped_by") == "pruned":
        state = SearchTrial.PRUNED
    elif exp.status == Experiment.SUCCEEDED and isinstance(m.get("val_acc"), int | float):
        state = SearchTrial.COMPLETE
    elif exp.status == Experiment.SUCCEEDED:
        state, reason = SearchTrial.FAILED, "no validation accuracy was measured"
    elif exp.status == Experiment.CANCELLED:
        state = SearchTrial.CANCELLED
    else:
        state, reason = SearchTrial.FAILED, exp.error or "the trial's job failed"
    updated = SearchTrial.objects.filter(pk=trial.pk, state__in=SearchTrial.ACTIVE).update(
        state=state, metrics={**(trial.metrics or {}), **metrics}, reason=reason, finished=timezone.now()
    )
    if not updated:
        return False
    trial.refresh_from_db()
    values = None
    if state == SearchTrial.COMPLETE:
        values = (float(metrics["val_acc"]), float(searches.cost_of(search.budget, trial) or 0.0))
    try:
        search_study.tell(search, trial.number, trial.prune_number, state, values)
    except Exception:  # noqa: BLE001 - the row is the record; a study that missed one outcome still samples
        log.warning("search %s: could not tell trial %s to the study", search.pk, trial.number, exc_info=True)
    searches.send(search.pk, [searches.trial_message(trial)])
    return True


def after_job(experiment_id: int) -> None:
    """After a delivery of a job: if it is a search trial and ended, settle it and advance its search."""
    from webapp.studio.search import enqueue_advance
    from webapp.studio.search_models import SearchTrial

    close_old_connections()
    trial = SearchTrial.objects.select_related("search").filter(experiment_id=experiment_id).first()
    if trial is None:
        return
    try:
        settle(trial, trial.search)
    finally:
        enqueue_advance(trial.search_id)


def sweep() -> int:
    """Advance running searches with no active trial left (their last advance was lost); for workers.cleanup."""
    from webapp.studio.search import enqueue_advance
    from webapp.studio.search_models import Search, SearchTrial

    count = 0
    stale = timezone.now() - datetime.timedelta(minutes=2)
    for search in Search.objects.filter(status__in=Search.ACTIVE, created__lt=stale):
        if not search.trial_rows.filter(state__in=SearchTrial.ACTIVE, experiment__status="running").exists():
            enqueue_advance(search.pk)
            count += 1
    return count


# --- hooks of a trial's job (workers/jobs.py) ---------------------------------------------------------------


def _trial_of(exp: Any) -> Any:
    from webapp.studio.search_models import SearchTrial

    return SearchTrial.objects.select_related("search").filter(experiment_id=exp.pk).first()


class TrialStop:
    """The job's stop signal plus the pruner's verdict (`pruned`); everything else is the inner signal's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pruned = False

    def __call__(self) -> bool:
        return bool(self.inner()) or self.pruned

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TrialSink:
    """The job's metrics sink; each epoch's val_acc also goes to the trial's pruning twin and its row."""

    def __init__(self, inner: Any, trial: Any, stop: TrialStop) -> None:
        self.inner, self.trial, self.stop = inner, trial, stop

    def log(self, step: int, values: Any) -> None:
        self.inner.log(step, values)
        acc, epoch = values.get("val/acc"), values.get("epoch")
        if acc is None or epoch is None or self.stop.pruned:
            return
        whole = round(float(epoch))
        if whole < 1 or abs(float(epoch) - whole) > 1e-6:
            return  # a report cut short (stopped mid-epoch) is not a rung of successive halving
        self._report(float(acc), whole)

    def _report(self, acc: float, epoch: int) -> None:
        from webapp.studio import search as searches
        from webapp.studio import search_study
        from webapp.studio.search_models import SearchTrial

        trial = self.trial
        trial.metrics = {**(trial.metrics or {}), "val_acc_last": acc, "epoch": epoch}
        SearchTrial.objects.filter(pk=trial.pk).update(metrics=trial.metrics)
        try:
            if trial.prune_number is not None and search_study.report(
                trial.search, trial.prune_number, acc, epoch
            ):
                self.stop.pruned = True
                log.info("search %s trial %s pruned at epoch %s", trial.search_id, trial.number, epoch)
        except Exception:  # noqa: BLE001 - a failed report must not fail the training it measures
            log.warning("search %s: could not report trial %s", trial.search_id, trial.number, exc_info=True)
        searches.send(trial.search_id, [{**searches.trial_message(trial), "val_acc": acc, "epoch": epoch}])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def wrap(exp: Any, sink: Any, stop: Any) -> tuple[Any, Any]:
    """For a search trial: (TrialSink, TrialStop) around the job's own; otherwise both unchanged."""
    from webapp.studio import search as searches
    from webapp.studio.search_models import SearchTrial

    trial = _trial_of(exp)
    if trial is None:
        return sink, stop
    if SearchTrial.objects.filter(pk=trial.pk, state=SearchTrial.QUEUED).update(state=SearchTrial.RUNNING):
        trial.state = SearchTrial.RUNNING
        searches.send(trial.search_id, [searches.trial_message(trial)])
    trial_stop = TrialStop(stop)
    return TrialSink(sink, trial, trial_stop), trial_stop


def run_options(exp: Any) -> dict[str, Any]:
    """Extra run_experiment arguments: a trial does not export (after_run exports the chosen ones)."""
    return {"export": False} if _trial_of(exp) is not None else {}


def after_run(exp: Any, result: Any, dataset: Any, out_dir: Path, stop: Any) -> Any:
    """Export a finished (not pruned, not stopped) trial's student when it lands on its search's front."""
    from kd_core.search import pareto_front
    from webapp.studio import search as searches
    from webapp.studio.search_models import SearchTrial

    trial = _trial_of(exp)
    if trial is None or result.stopped or getattr(stop, "pruned", False) or result.model is None:
        return result
    acc = result.metrics.get("val_acc")
    cost_key = {"latency_ms": "latency_ms", "size_bytes": "size_bytes", "params": "params"}[
        searches.Budget(**trial.search.budget).cost
    ]
    cost = (trial.figures or {}).get(cost_key)
    if not isinstance(acc, int | float) or cost is None:
        return result
    points = [("self", float(acc), float(cost))]
    for other in trial.search.trial_rows.filter(state=SearchTrial.COMPLETE).exclude(pk=trial.pk):
        a, c = (other.metrics or {}).get("val_acc"), (other.figures or {}).get(cost_key)
        if isinstance(a, int | float) and c is not None:
            points.append((other.pk, float(a), float(c)))
    if "self" not in pareto_front(points):
        return result
    from kd_core.data.loader import sample_inputs
    from kd_core.export import export_model

    result.files = export_model(
        result.model, out_dir, basename="student", class_names=list(dataset.class_names),
        sample_inputs=sample_inputs(dataset, 16),
        extra_metadata={"experiment": {"kind": "distill", "name": exp.name, "search": trial.search_id}},
    )  # fmt: skip
    result.metrics["exported_as"] = "on the search's front"
    return result
