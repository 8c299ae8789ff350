"""Codistillation spread over workers: one Celery task per group, swapping copies through the shared state folder.

Chosen per experiment by `"codistill": {"placement": "workers"}` (worth it when at least `replicas`
training workers are up; with fewer the groups run one after another and see older copies of each other).
The experiment's own task fans out `workers.run_codistill_group(id, g)` for every group and returns;
each group trains with kd_core's `run_codistill_group` against a FileExchange in
`KD_STATE_DIR/jobs/<id>/exchange` (shared storage when workers are on several machines), leaves
`group<g>.json` with its files or its error, and the last group to finish combines them
(`combine_group_results`), stores the artifacts and sets the final status.

While it runs, each group keeps `progress/group<g>.json` fresh (worker name, progress, ETA, a
heartbeat every HEARTBEAT_S): the experiment's progress is the mean over groups (an ended group
counts as done), its ETA the slowest group's. A group that finishes while others still train
waits for them, unless one has not started yet (it then finishes last and combines; waiting
would hold the worker it needs). A group whose heartbeat is older than KD_CODISTILL_STALE_S
(its worker died: a SIGKILLed worker's message stays unacknowledged for hours) is recorded as
failed by the one that waits, which then combines without it. Outcome: `succeeded` when at least
one replica survives, with `metrics["group_errors"]` naming each lost group and why; `failed`
only when no group left a replica. `metrics["groups"]` lists, per group, the worker that ran it,
its start and end time (Unix seconds), steps trained and error, if any.

Nobody waits for the last group to start, so if its worker dies no group is left to notice; the
`workers.codistill_watchdog` beat task (`settle_abandoned`) then finishes such an experiment the
same way: every unfinished group stale (or never started within KD_CODISTILL_START_S of the last
sign of life), the stale ones recorded as lost, combined by `_combine_if_last` under the same lock.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from django.db import close_old_connections

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0


def stale_after_s() -> float:
    """How long a group may stay silent before the others count it dead (KD_CODISTILL_STALE_S)."""
    try:
        value = float(os.environ.get("KD_CODISTILL_STALE_S", "60"))
    except ValueError:
        return 60.0
    return value if math.isfinite(value) and value >= 3 * HEARTBEAT_S else 60.0


def start_window_s() -> float:
    """How long a queued group may stay unstarted after the last sign of life before it counts as lost.

    Generous (KD_CODISTILL_START_S, default 6 h): a group legitimately waits behind other jobs in the queue.
    """
    try:
        value = float(os.environ.get("KD_CODISTILL_START_S", "21600"))
    except ValueError:
        return 21600.0
    return max(value, stale_after_s()) if math.isfinite(value) else 21600.0


def spread_enabled(exp: Any) -> bool:
    """A codistillation whose config asks for placement "workers" (kd_core runs every other one in-process)."""
    options = (exp.config.get("codistill") or {}) if exp.kind == "codistill" else {}
    return options.get("placement") == "workers" and int(options.get("replicas", 2)) > 1


def fan_out(exp: Any, folder: Path) -> str:
    """Enqueue one group task per replica; the experiment stays `running` until the last one combines."""
    from webapp.celery import app

    replicas = int((exp.config.get("codistill") or {}).get("replicas", 2))
    folder.mkdir(parents=True, exist_ok=True)
    for marker in folder.glob("group*.json"):
        marker.unlink()  # an earlier attempt's outcome must not count for this one
    (folder / "combine.lock").unlink(missing_ok=True)
    shutil.rmtree(folder / "progress", ignore_errors=True)
    (folder / "fanned_out").touch()  # when the groups were queued: the watchdog's start window counts from it
    for g in range(replicas):
        app.send_task("workers.run_codistill_group", args=[exp.pk, g], queue="gpu")
    return f"running: {replicas} codistillation groups queued"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _write_marker(folder: Path, group: int, payload: dict[str, Any]) -> None:
    _write_json(folder / f"group{group}.json", payload)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class GroupReporter:
    """One group's heartbeat and progress in the shared folder, and the experiment's status from all groups.

    Wraps the group's DbChannelSink: metrics pass through; `status` records this group's own
    progress and hands the sink the mean over groups (ended groups count 1) and the slowest ETA.
    A thread rewrites the file every HEARTBEAT_S, so loading and exporting count as alive too.
    """

    def __init__(
        self, sink: Any, folder: Path, group: int, replicas: int, worker: str, attempt: int = 1
    ) -> None:
        self.sink, self.folder, self.group, self.replicas = sink, folder, group, replicas
        self.path = folder / "progress" / f"group{group}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = {
            "worker": worker,
            "started": time.time(),
            "progress": 0.0,
            "eta_s": None,
            "attempt": attempt,  # how many deliveries have run this group (KD_MAX_ATTEMPTS caps it)
            "token": uuid.uuid4().hex,  # this delivery's; another one in the file means it took the group over
        }
        self.lost = False
        self._last_mean = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"codistill-heartbeat-{group}", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        with self._lock:
            current = _read_json(self.path)
            if current is not None and current.get("token") not in (None, self.state["token"]):
                self.lost = True  # our heartbeat went stale and another delivery took the group over
                return
            _write_json(self.path, {**self.state, "beat": time.time()})

    def check(self) -> None:
        if self.lost:
            from workers.records import LeaseLost

            raise LeaseLost(f"codistillation group {self.group}: another delivery runs it now")

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and not self.lost:
            try:
                self.beat()
            except OSError:
                log.warning("codistillation group %s: heartbeat not written", self.group, exc_info=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.check()
        self.sink.log(step, values)

    def status(self, progress: float, eta_s: float | None) -> None:
        from kd_core.codistill import group_status

        self.check()
        self.state["progress"], self.state["eta_s"] = float(progress), eta_s
        if time.monotonic() - self._last_mean < 1.0:
            return  # reading every group's file each logged step would be wasted work
        self._last_mean = time.monotonic()
        self.beat()
        progress_by, eta_by = {}, {}
        for g in range(self.replicas):
            if (self.folder / f"group{g}.json").exists():
                progress_by[g], eta_by[g] = 1.0, None
                continue
            other = (
                self.state
                if g == self.group
                else (_read_json(self.folder / "progress" / f"group{g}.json") or {})
            )
            progress_by[g], eta_by[g] = float(other.get("progress") or 0.0), other.get("eta_s")
        self.sink.status(*group_status(progress_by, eta_by))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _group_state(folder: Path, g: int, stale_s: float) -> tuple[str, dict[str, Any]]:
    """("done" | "running" | "dead" | "waiting", what the group last wrote) of group g."""
    if (folder / f"group{g}.json").exists():
        return "done", {}
    beat = _read_json(folder / "progress" / f"group{g}.json")
    if beat is None:
        return "waiting", {}
    age = time.time() - float(beat.get("beat") or 0.0)
    return ("dead" if age > stale_s else "running"), beat


def run_group(experiment_id: int, group: int, *, hostname: str = "") -> str:
    """Train group `group` of a spread codistillation; the last group to finish completes the experiment."""
    from kd_core.codistill import FileExchange, run_codistill_group
    from kd_core.device import pick_device
    from webapp.studio.models import Experiment
    from workers.records import (
        LeaseLost,
        StopSignal,
        human_error,
        job_dir,
        max_attempts,
        resolve_inputs,
        time_budget_s,
    )
    from workers.sink import DbChannelSink

    close_old_connections()
    exp = Experiment.objects.select_related("dataset", "teacher").filter(pk=experiment_id).first()
    if exp is None or exp.status != Experiment.RUNNING:
        return "skipped: experiment not running"
    folder = job_dir(exp.pk)
    if (folder / f"group{group}.json").exists():
        return "skipped: group already recorded (lost, or a redelivered message)"
    replicas = int((exp.config.get("codistill") or {}).get("replicas", 2))
    worker = hostname or socket.gethostname()
    previous = _read_json(folder / "progress" / f"group{group}.json")
    if previous is not None:
        # Another delivery of this group ran (or runs): one with a fresh heartbeat is alive, so exit;
        # a silent one died. After KD_MAX_ATTEMPTS such deaths the group is recorded as lost.
        if _wait_until_silent(folder, group) == "running":
            return "skipped: another delivery is running this group (its heartbeat is fresh)"
        died = int(previous.get("attempt") or 1)
        if died >= max_attempts():
            _write_marker(folder, group, {
                "worker": previous.get("worker", ""), "started": previous.get("started"), "finished": time.time(),
                "error": f"lost: the worker died {died} times running this group",
            })  # fmt: skip
            return _combine_when_settled(exp, folder, replicas)
    sink = DbChannelSink(exp.pk)
    reporter = GroupReporter(
        sink, folder, group, replicas, worker, attempt=int((previous or {}).get("attempt") or 0) + 1
    )
    # The job's time limit counts from the fan-out (the groups run side by side).
    ran_s = time.time() - (folder / "fanned_out").stat().st_mtime if (folder / "fanned_out").exists() else 0.0
    stop = StopSignal(exp.pk, budget_s=time_budget_s(exp.config, ran_s))
    payload: dict[str, Any] = {"worker": worker, "started": reporter.state["started"]}
    try:
        config, dataset, _ = resolve_inputs(exp, folder)
        result = run_codistill_group(
            config, dataset, group, FileExchange(folder / "exchange"), out_dir=folder / f"group{group}",
            sink=reporter, should_stop=stop, device=pick_device("auto"),
        )  # fmt: skip
        payload["files"] = {k: str(v) for k, v in result.files.items()}
        payload["stopped"] = bool(result.stopped)
        if result.stopped and stop.time_limited:
            payload["stopped_by"] = "time_limit"
        payload["steps"] = int((result.metrics or {}).get("steps", 0))
    except LeaseLost:
        reporter.stop()
        return "abandoned: another delivery took this group over"
    except Exception as exc:  # noqa: BLE001 - the group's reason is recorded; the others carry on
        log.exception("experiment %s: codistillation group %s failed", exp.pk, group)
        payload["error"] = human_error(exc)
    finally:
        reporter.stop()
        sink.close()
    payload["finished"] = time.time()
    _write_marker(folder, group, payload)
    return _combine_when_settled(exp, folder, replicas)


def _wait_until_silent(folder: Path, group: int) -> str:
    """ "running" while another delivery's heartbeat for `group` stays fresh (checked for a stale period), else "dead"."""
    stale_s = stale_after_s()
    give_up = time.monotonic() + stale_s + 2 * HEARTBEAT_S
    while True:
        kind, _ = _group_state(folder, group, stale_s)
        if kind != "running":
            return "dead"
        if time.monotonic() > give_up:
            return "running"
        time.sleep(HEARTBEAT_S)


def _combine_when_settled(exp: Any, folder: Path, replicas: int) -> str:
    """Combine once every group has ended or gone silent; leave it to a group that has yet to start."""
    stale_s = stale_after_s()
    while True:
        states = {g: _group_state(folder, g, stale_s) for g in range(replicas)}
        kinds = {kind for kind, _ in states.values()}
        if "waiting" in kinds:
            return "group done; a group has yet to start and will combine"
        if "running" not in kinds:
            break
        time.sleep(1.0)
    _record_lost(folder, states)
    return _combine_if_last(exp, folder)


def _record_lost(folder: Path, states: dict[int, tuple[str, dict[str, Any]]], waited_s: float = 0.0) -> None:
    """Write a "lost" marker for each dead group (and each never-started one, when `waited_s` is given)."""
    for g, (kind, beat) in states.items():
        if (folder / f"group{g}.json").exists():
            continue
        if kind == "dead":
            silent = time.time() - float(beat.get("beat") or 0.0)
            _write_marker(folder, g, {
                "worker": beat.get("worker", ""), "started": beat.get("started"), "finished": None,
                "error": f"lost: its worker {beat.get('worker') or '?'} stopped reporting {silent:.0f} s ago "
                f"at {100 * float(beat.get('progress') or 0.0):.0f}% (killed or unreachable)",
            })  # fmt: skip
        elif kind == "waiting" and waited_s:
            _write_marker(folder, g, {
                "worker": "", "started": None, "finished": None,
                "error": f"lost: it never started in {waited_s:.0f} s (its task was lost or no worker took it)",
            })  # fmt: skip


def _last_sign_of_life(folder: Path, replicas: int, states: dict[int, tuple[str, dict[str, Any]]]) -> float:
    """Unix time of the fan-out, the latest group end or the latest heartbeat, whichever came last."""
    times = [(folder / "fanned_out").stat().st_mtime]
    for g in range(replicas):
        marker = _read_json(folder / f"group{g}.json") or {}
        times += [float(marker.get("finished") or 0.0), float(states[g][1].get("beat") or 0.0)]
    return max(times)


def settle_abandoned() -> list[int]:
    """Finish spread codistillations that no group is left to finish; returns the experiment ids settled.

    One qualifies when every group without an outcome is stale (heartbeat older than
    KD_CODISTILL_STALE_S) or has not started within KD_CODISTILL_START_S of the last sign of life:
    typically the last group to start died after the others returned (or every group ended but
    the last finisher died before combining). A group that is merely slow
    keeps its heartbeat fresh and is never touched. The combine itself is `_combine_if_last`, whose
    lock file lets exactly one caller (a finishing group or this) combine; a second run finds the
    experiment no longer running, so this is safe to repeat.
    """
    from webapp.studio.models import Experiment
    from workers.records import job_dir

    close_old_connections()
    stale_s, start_s = stale_after_s(), start_window_s()
    settled = []
    for exp in Experiment.objects.filter(status=Experiment.RUNNING, kind="codistill"):
        folder = job_dir(exp.pk)
        if (
            not spread_enabled(exp)
            or not (folder / "fanned_out").exists()
            or (folder / "combine.lock").exists()
        ):
            continue  # not fanned out yet (its own task is alive or will be redelivered), or combining now
        replicas = int((exp.config.get("codistill") or {}).get("replicas", 2))
        try:
            states = {g: _group_state(folder, g, stale_s) for g in range(replicas)}
            kinds = {kind for kind, _ in states.values()}
            if "running" in kinds:
                continue
            waited = time.time() - _last_sign_of_life(folder, replicas, states)
            if ("waiting" in kinds and waited <= start_s) or (kinds == {"done"} and waited <= stale_s):
                continue  # queued behind other jobs, or the last finisher is just taking the lock
            log.warning(
                "experiment %s: no codistillation group left alive; finishing it without them", exp.pk
            )
            _record_lost(folder, states, waited_s=waited)
            outcome = _combine_if_last(exp, folder)
        except OSError:
            log.warning("experiment %s: codistillation folder changed while checked", exp.pk, exc_info=True)
            continue
        if outcome in Experiment.FINISHED:
            settled.append(exp.pk)
    return settled


def _combine_if_last(exp: Any, folder: Path) -> str:
    from django.utils import timezone

    from kd_core.codistill import combine_group_results
    from webapp.studio.models import Experiment
    from webapp.studio.services import register_trained_model
    from workers.records import finish, human_error, json_metrics, resolve_inputs, save_artifacts
    from workers.sink import DbChannelSink

    replicas = int((exp.config.get("codistill") or {}).get("replicas", 2))
    markers = [folder / f"group{g}.json" for g in range(replicas)]
    if not all(m.exists() for m in markers):
        return "group done; waiting for the others"
    try:  # exactly one finisher combines, even if two groups end at the same moment
        os.close(os.open(folder / "combine.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return "group done; another group combines"
    outcomes = [json.loads(m.read_text()) for m in markers]
    errors = [f"group {g}: {o['error']}" for g, o in enumerate(outcomes) if "error" in o]
    group_files = [o.get("files") for o in outcomes]
    exp.refresh_from_db()
    sink = DbChannelSink(exp.pk)
    try:
        if not any(group_files):
            finish(exp, Experiment.FAILED, error="; ".join(errors) or "no group left a replica")
            return Experiment.FAILED
        config, dataset, _ = resolve_inputs(exp, folder)
        step = max((int(o.get("steps") or 0) for o in outcomes), default=0) or None
        result = combine_group_results(
            config, dataset, group_files, out_dir=folder / "out", sink=sink, step=step
        )
        # A group stopped by the time limit keeps what it trained: the experiment still succeeds.
        time_limited = any(o.get("stopped_by") == "time_limit" for o in outcomes)
        stopped = exp.cancel_requested or any(
            o.get("stopped") and o.get("stopped_by") != "time_limit" for o in outcomes
        )
        save_artifacts(exp, result.files)
        if not stopped and result.files.get("safetensors"):
            register_trained_model(exp, str(result.files["safetensors"]))
        metrics = json_metrics(result.metrics)
        if errors:
            metrics["group_errors"] = errors
        if time_limited and not stopped:
            metrics["stopped_by"] = "time_limit"
        metrics["groups"] = [
            {"group": g, **{k: o.get(k) for k in ("worker", "started", "finished", "steps", "error")}}
            for g, o in enumerate(outcomes)
        ]
        status = Experiment.CANCELLED if stopped else Experiment.SUCCEEDED
        done = {"progress": 1.0} if status == Experiment.SUCCEEDED else {}
        finish(exp, status, metrics=metrics, eta_s=None, finished=timezone.now(), **done)
    except Exception as exc:  # noqa: BLE001
        log.exception("experiment %s: combining the codistillation groups failed", exp.pk)
        finish(exp, Experiment.FAILED, error=human_error(exc))
        return Experiment.FAILED
    finally:
        sink.close()
    shutil.rmtree(folder, ignore_errors=True)
    return status
