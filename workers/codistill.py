"""Codistillation spread over workers: one Celery task per group, swapping copies through the shared state folder.

Chosen per experiment by `"codistill": {"placement": "workers"}` (worth it when at least `replicas`
training workers are up; with fewer the groups run one after another and see older copies of each other).
The experiment's own task fans out `workers.run_codistill_group(id, g)` for every group and returns;
each group trains with kd_core's `run_codistill_group` against a FileExchange in
`KD_STATE_DIR/jobs/<id>/exchange` (shared storage when workers are on several machines), leaves
`group<g>.json` with its files or its error, and the last group to finish combines them
(`combine_group_results`), stores the artifacts and sets the final status.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from django.db import close_old_connections

log = logging.getLogger(__name__)


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
    for g in range(replicas):
        app.send_task("workers.run_codistill_group", args=[exp.pk, g], queue="gpu")
    return f"running: {replicas} codistillation groups queued"


def _write_marker(folder: Path, group: int, payload: dict[str, Any]) -> None:
    tmp = folder / f".group{group}.json.tmp"
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, folder / f"group{group}.json")


def run_group(experiment_id: int, group: int, *, hostname: str = "") -> str:
    """Train group `group` of a spread codistillation; the last group to finish completes the experiment."""
    from kd_core.codistill_exchange import FileExchange
    from kd_core.codistill_group import run_codistill_group
    from kd_core.device import pick_device
    from webapp.studio.models import Experiment
    from workers.jobs import StopSignal, _human_error, job_dir, resolve_inputs
    from workers.sink import DbChannelSink

    close_old_connections()
    exp = Experiment.objects.select_related("dataset", "teacher").filter(pk=experiment_id).first()
    if exp is None or exp.status != Experiment.RUNNING:
        return "skipped: experiment not running"
    folder = job_dir(exp.pk)
    sink = DbChannelSink(exp.pk)
    stop = StopSignal(exp.pk)
    try:
        config, dataset, _ = resolve_inputs(exp, folder)
        result = run_codistill_group(
            config, dataset, group, FileExchange(folder / "exchange"), out_dir=folder / f"group{group}",
            sink=sink, should_stop=stop, device=pick_device("auto"),
        )  # fmt: skip
        payload = {"files": {k: str(v) for k, v in result.files.items()}, "stopped": bool(result.stopped)}
    except Exception as exc:  # noqa: BLE001 - the group's reason is recorded; the others carry on
        log.exception("experiment %s: codistillation group %s failed", exp.pk, group)
        payload = {"error": _human_error(exc)}
    finally:
        sink.close()
    _write_marker(folder, group, payload)
    return _combine_if_last(exp, folder)


def _combine_if_last(exp: Any, folder: Path) -> str:
    from django.utils import timezone

    from kd_core.codistill_group import combine_group_results
    from webapp.studio.models import Experiment
    from webapp.studio.services import register_trained_model
    from workers.jobs import _finish, _human_error, _json_metrics, _save_artifacts, resolve_inputs
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
            _finish(exp.pk, status=Experiment.FAILED, error="; ".join(errors) or "no group left a replica")
            return Experiment.FAILED
        config, dataset, _ = resolve_inputs(exp, folder)
        result = combine_group_results(config, dataset, group_files, out_dir=folder / "out", sink=sink)
        stopped = exp.cancel_requested or any(o.get("stopped") for o in outcomes)
        _save_artifacts(exp, result.files)
        if not stopped and result.files.get("safetensors"):
            register_trained_model(exp, str(result.files["safetensors"]))
        metrics = _json_metrics(result.metrics)
        if errors:
            metrics["group_errors"] = errors
        status = Experiment.CANCELLED if stopped else Experiment.SUCCEEDED
        done = {"progress": 1.0} if status == Experiment.SUCCEEDED else {}
        _finish(exp.pk, status=status, metrics=metrics, eta_s=None, finished=timezone.now(), **done)
    except Exception as exc:  # noqa: BLE001
        log.exception("experiment %s: combining the codistillation groups failed", exp.pk)
        _finish(exp.pk, status=Experiment.FAILED, error=_human_error(exc))
        return Experiment.FAILED
    finally:
        sink.close()
    shutil.rmtree(folder, ignore_errors=True)
    return status
