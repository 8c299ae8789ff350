"""The REST API (thin views): parse and check the request, call services, answer JSON. See shared/API.md."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.db import connection
from django.db.models import Max
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET

from webapp.celery import app as celery_app
from webapp.studio import services
from webapp.studio.auth import ApiError, api_view, error, json_body
from webapp.studio.downsample import series_points
from webapp.studio.models import Artifact, Checkpoint, Dataset, Experiment, MetricPoint

log = logging.getLogger(__name__)

DOWNLOAD_FORMATS = {
    "safetensors": "safetensors",
    "torchscript": "ts",
    "onnx": "onnx",
    "exported_program": "pt2",
}
HEADLINE_METRICS = ("val_acc", "test_acc", "student_params", "teacher_acc", "best_replica")
MAX_COMPARE = 20


# --- JSON shapes ------------------------------------------------------------------------------


def _time(value) -> str | None:
    return value.isoformat() if value else None


def dataset_json(d: Dataset, detail: bool = False) -> dict[str, Any]:
    info = d.inspection or {}
    out = {
        "id": d.pk,
        "name": d.name,
        "format": d.format,
        "status": d.status,
        "error": d.error or None,
        "num_samples": info.get("num_samples"),
        "num_classes": info.get("num_classes"),
        "input_shape": info.get("input_shape"),
        "class_names": info.get("class_names"),
        "class_counts": info.get("class_counts"),
        "empty_classes": info.get("empty_classes"),
        "labeled": info.get("labeled"),
        "is_image": info.get("is_image"),
        "size": d.size,
        "options": d.options,
        # Fraction ingested while "ingesting"; 1 once ready.
        "progress": 1.0 if d.status == Dataset.READY else round(d.progress, 4),
        "import_path": d.import_path or None,
        "created": _time(d.created),
    }
    if detail:
        out["splits"] = info.get("splits")
        out["preview"] = info.get("preview")
        out["inspection"] = info
    return out


def checkpoint_json(c: Checkpoint) -> dict[str, Any]:
    return {
        "id": c.pk,
        "name": c.name,
        "format": c.format,
        "num_params": c.num_params,
        "input_shape": c.input_shape,
        "num_classes": c.num_classes,
        "class_names": c.class_names,
        "arch": c.arch,
        "preprocessing": c.preprocessing,
        "role": c.role,
        "source_experiment": c.source_experiment_id,
        "dataset": c.dataset_id,
        "coverage": c.coverage,  # soft labels: fraction of the dataset's train samples with a prediction
        "size": c.size,
        "status": c.status,
        "error": c.error,
        "created": _time(c.created),
    }


def _ref(obj) -> dict[str, Any] | None:
    return {"id": obj.pk, "name": obj.name} if obj else None


def experiment_json(e: Experiment, detail: bool = False) -> dict[str, Any]:
    out = {
        "id": e.pk,
        "name": e.name,
        "kind": e.kind,
        "status": e.status,
        "progress": e.progress,
        "eta_s": e.eta_s,
        "error": e.error,
        "dataset": _ref(e.dataset),
        "teacher": _ref(e.teacher),
        "sweep_group": e.sweep_group or None,
        "created": _time(e.created),
        "started": _time(e.started),
        "finished": _time(e.finished),
    }
    if detail:
        out.update(
            config=e.config,
            metrics=_finite(e.metrics),
            timings=e.timings,
            attempts=e.attempts,
            cancel_requested=e.cancel_requested,
            worker=e.worker,
            device=e.device,
            artifacts=[
                {
                    "kind": a.kind,
                    "replica": a.replica,
                    "size": a.size,
                    "sha256": a.sha256,
                    "url": _download_url(e, a),
                }
                for a in e.artifacts.all()
                if a.kind in DOWNLOAD_FORMATS
            ],
        )
    else:
        out["metrics"] = _finite({k: e.metrics[k] for k in HEADLINE_METRICS if k in (e.metrics or {})})
    return out


def _download_url(e: Experiment, a: Artifact) -> str:
    url = f"/api/experiments/{e.pk}/download/?format={a.kind}"
    return url if a.replica is None else f"{url}&replica={a.replica}"


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: a diverged loss is reported as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --- query-string helpers ---------------------------------------------------------------------


def _int_param(request: HttpRequest, key: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.GET.get(key)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(f"'{key}' must be an integer; got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(f"'{key}' must be between {lo} and {hi}; got {value}")
    return value


MAX_ID = 2**63 - 1  # the database's bigint range; no row has an id above it


def _positive_int(raw: str) -> int | None:
    """An ASCII decimal integer (str.isdigit() also accepts '²', which int() refuses), else None."""
    return int(raw) if raw.isascii() and raw.isdigit() else None


def _bool_param(request: HttpRequest, key: str) -> bool:
    return request.GET.get(key, "").lower() in ("1", "true", "yes", "on")


def _upload(request: HttpRequest):
    if not request.content_type.startswith("multipart/form-data"):
        raise ApiError("send multipart/form-data with a 'file' field")
    services.check_storage_quota(request.user, 1)  # already full: refused before the body is read
    files = request.FILES  # parsing happens here, streamed to temporary files
    if getattr(request, "upload_too_large", False):
        limit_mb = settings.KD_MAX_UPLOAD_BYTES // (1024 * 1024)
        raise ApiError(f"the upload is larger than the limit of {limit_mb} MB", 413)
    upload = files.get("file")
    if upload is None:
        raise ApiError("the 'file' field is missing")
    services.check_storage_quota(request.user, upload.size)  # before anything reaches storage
    return upload


# --- datasets ---------------------------------------------------------------------------------


@api_view(["GET", "POST"])
def datasets(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        rows = Dataset.objects.filter(owner=request.user)
        return JsonResponse({"datasets": [dataset_json(d) for d in rows]})
    if request.content_type == "application/json":
        body = json_body(request)
        if "import_path" not in body:
            raise ApiError(
                "send multipart/form-data with a 'file' field to upload, or JSON with 'import_path' to import "
                "a file or folder under the server's import root"
            )
        options = _dataset_options(body.get("label_column"), body.get("image_size"))
        dataset = services.import_dataset(request.user, body.get("name"), body["import_path"], options)
        return JsonResponse(dataset_json(dataset, detail=True), status=202)
    upload = _upload(request)
    options = _dataset_options(request.POST.get("label_column"), request.POST.get("image_size"))
    dataset = services.create_dataset(request.user, upload, request.POST.get("name"), options)
    # 202: a large file is ingested by a worker; GET shows the row "ready" or "failed" later.
    status = 202 if dataset.status == Dataset.INGESTING else 201
    return JsonResponse(dataset_json(dataset, detail=True), status=status)


def _dataset_options(label_column: Any, image_size: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if label_column is not None and not isinstance(label_column, str):
        raise ApiError("'label_column' must be a string")
    if label_column and label_column.strip():
        options["label_column"] = label_column.strip()
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = str(image_size)
    if image_size is not None and not isinstance(image_size, str):
        raise ApiError(f"'image_size' must be a positive integer; got {image_size!r}")
    if image_size and image_size.strip():
        if not _positive_int(image_size.strip()):
            raise ApiError(f"'image_size' must be a positive integer; got {image_size!r}")
        options["image_size"] = int(image_size.strip())
    return options


@api_view(["GET", "DELETE"])
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    if request.method == "DELETE":
        services.delete_dataset(dataset)
        return HttpResponse(status=204)
    return JsonResponse(dataset_json(dataset, detail=True))


@api_view(["GET"])
def dataset_index(request: HttpRequest, pk: int) -> HttpResponse:
    """One CSV row per sample (index,split,label,source), streamed from the store."""
    from webapp.studio import dataset_index as index

    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    fmt = request.GET.get("format", "csv")
    if fmt != "csv":
        raise ApiError(f"'format' must be csv; got {fmt!r}")
    chunks = index.csv_chunks(dataset)  # 409 before the first byte when there is no store to read
    response = StreamingHttpResponse(
        _async_chunks(chunks) if isinstance(request, ASGIRequest) else chunks,
        content_type="text/csv; charset=utf-8",
    )
    response["Content-Disposition"] = f'attachment; filename="{_slug(dataset.name)}-{dataset.pk}-index.csv"'
    return response


# --- checkpoints ------------------------------------------------------------------------------


@api_view(["GET", "POST"])
def checkpoints(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        rows = Checkpoint.objects.filter(owner=request.user)
        role = request.GET.get("role")
        if role:
            rows = rows.filter(role=role)
        return JsonResponse({"checkpoints": [checkpoint_json(c) for c in rows]})
    upload = _upload(request)
    arch = None
    raw_arch = request.POST.get("arch", "").strip()
    if raw_arch:
        try:
            arch = json.loads(raw_arch)
        except ValueError as exc:
            raise ApiError(f"'arch' is not valid JSON: {exc}") from None
    dataset = None
    raw_dataset = request.POST.get("dataset", "").strip()
    if raw_dataset:
        dataset_id = _positive_int(raw_dataset)
        if dataset_id is None:
            raise ApiError(f"'dataset' must be a dataset id; got {raw_dataset!r}")
        dataset = (
            Dataset.objects.filter(owner=request.user, pk=dataset_id).first()
            if dataset_id <= MAX_ID
            else None
        )
        if dataset is None:
            raise ApiError(f"dataset {raw_dataset} not found among your datasets")
        if dataset.status != Dataset.READY:
            raise ApiError(
                f"dataset {raw_dataset} is not ready ({dataset.status}); its shape is not known yet"
            )
    if upload.name.lower().endswith(".npz"):  # soft labels: predictions for one dataset's samples
        from webapp.studio.soft_labels import create_soft_label_checkpoint

        checkpoint = create_soft_label_checkpoint(request.user, upload, request.POST.get("name"), dataset)
        return JsonResponse(checkpoint_json(checkpoint), status=201)
    preprocessing = None
    raw_preprocessing = request.POST.get("preprocessing", "").strip()
    if raw_preprocessing:
        try:
            preprocessing = json.loads(raw_preprocessing)
        except ValueError as exc:
            raise ApiError(f"'preprocessing' is not valid JSON: {exc}") from None
    checkpoint = services.create_checkpoint(
        request.user, upload, request.POST.get("name"), arch, dataset, preprocessing=preprocessing
    )
    # 202: a large file is inspected by a worker (in the sandbox); GET shows it "ready" or "failed" later.
    status = 202 if checkpoint.status == Checkpoint.INSPECTING else 201
    return JsonResponse(checkpoint_json(checkpoint), status=status)


@api_view(["GET", "DELETE"])
def checkpoint_detail(request: HttpRequest, pk: int) -> HttpResponse:
    checkpoint = get_object_or_404(Checkpoint, pk=pk, owner=request.user)
    if request.method == "DELETE":
        services.delete_checkpoint(checkpoint)
        return HttpResponse(status=204)
    return JsonResponse(checkpoint_json(checkpoint))


# --- experiments ------------------------------------------------------------------------------


def _with_notes(answer: dict[str, Any], experiment: Experiment) -> dict[str, Any]:
    """`notes`: what the server changed in the config (e.g. a raised log_every); the stored config has it."""
    notes = getattr(experiment, "notes", None)
    return {**answer, "notes": notes} if notes else answer


@api_view(["GET", "POST"])
def experiments(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        body = json_body(request)
        created = services.create_experiments(request.user, body)
        if "sweep" in body:
            answer = {"ids": [e.pk for e in created], "sweep_group": created[0].sweep_group}
            return JsonResponse(_with_notes(answer, created[0]), status=201)
        answer = {"id": created[0].pk, "status": created[0].status}
        return JsonResponse(_with_notes(answer, created[0]), status=201)
    rows = Experiment.objects.filter(owner=request.user).select_related("dataset", "teacher")
    status = request.GET.get("status")
    if status:
        if status not in dict(Experiment.STATUSES):
            raise ApiError(f"'status' must be one of {', '.join(dict(Experiment.STATUSES))}")
        rows = rows.filter(status=status)
    kind = request.GET.get("kind")
    if kind:
        rows = rows.filter(kind=kind)
    dataset = _int_param(request, "dataset", None, 1, 2**62)
    if dataset is not None:
        rows = rows.filter(dataset_id=dataset)
    if request.GET.get("sweep_group"):
        rows = rows.filter(sweep_group=request.GET["sweep_group"])
    limit = _int_param(request, "limit", 200, 1, 1000)
    return JsonResponse({"experiments": [experiment_json(e) for e in rows[:limit]]})


def _own_experiment(request: HttpRequest, pk: int) -> Experiment:
    return get_object_or_404(
        Experiment.objects.select_related("dataset", "teacher"), pk=pk, owner=request.user
    )


@api_view(["GET"])
def experiment_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return JsonResponse(experiment_json(_own_experiment(request, pk), detail=True))


def series_of(
    experiment: Experiment,
    *,
    since: int | None = None,
    with_time: bool = False,
    names=None,
    max_points: int | None = None,
) -> dict:
    """{name: [[step, value(, time)], ...]} in step order, downsampled by the database to `max_points`."""
    series: dict[str, list] = {}
    for name, page in series_points(
        experiment.pk, since=since, names=names, max_points=max_points, with_time=with_time
    ):
        series.setdefault(name, []).extend(list(p) for p in page)
    return series


def _csv_chunks(experiment: Experiment, *, with_time: bool, **query: Any) -> Iterator[str]:
    """The CSV text a page of rows at a time: the export never holds a whole series."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "step", "value", "time"] if with_time else ["name", "step", "value"])
    for name, page in series_points(experiment.pk, with_time=with_time, **query):
        writer.writerows([name, *point] for point in page)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


async def _async_chunks(chunks: Iterator[str]) -> AsyncIterator[str]:
    """Each chunk from a database thread: under ASGI a sync iterator would be read whole into a list."""
    take = sync_to_async(lambda: next(chunks, None), thread_sensitive=True)
    while (chunk := await take()) is not None:
        yield chunk


@api_view(["GET"])
def experiment_metrics(request: HttpRequest, pk: int) -> HttpResponse:
    experiment = _own_experiment(request, pk)
    fmt = request.GET.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError("'format' must be json or csv")
    max_points = _int_param(request, "max_points", None, 2, 10_000_000)
    since = _int_param(request, "since", None, -1, 2**62)
    with_time = _bool_param(request, "with_time")
    names = [n for n in request.GET.get("names", "").split(",") if n] or None
    query = {"since": since, "names": names, "max_points": max_points}
    if fmt == "csv":
        chunks = _csv_chunks(experiment, with_time=with_time, **query)
        response = StreamingHttpResponse(
            _async_chunks(chunks) if isinstance(request, ASGIRequest) else chunks,
            content_type="text/csv; charset=utf-8",
        )
        response["Content-Disposition"] = (
            f'attachment; filename="{_slug(experiment.name)}-{experiment.pk}-metrics.csv"'
        )
        return response
    series = series_of(experiment, with_time=with_time, **query)
    last = MetricPoint.objects.filter(experiment=experiment).aggregate(m=Max("step"))["m"]
    return JsonResponse(
        {
            "series": _finite(series),
            "last_step": last,
            "status": experiment.status,
            "progress": experiment.progress,
        }  # fmt: skip
    )


@api_view(["POST"])
def experiment_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    experiment = services.cancel_experiment(_own_experiment(request, pk))
    return JsonResponse(
        {"id": experiment.pk, "status": experiment.status, "cancel_requested": experiment.cancel_requested}
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80] or "experiment"


@api_view(["GET"])
def experiment_download(request: HttpRequest, pk: int) -> HttpResponse:
    experiment = _own_experiment(request, pk)
    fmt = request.GET.get("format", "safetensors")
    if fmt not in DOWNLOAD_FORMATS:
        raise ApiError(f"'format' must be one of {', '.join(DOWNLOAD_FORMATS)}; got {fmt!r}")
    replica = _int_param(request, "replica", None, 0, 1023)
    artifacts = Artifact.objects.filter(experiment=experiment, kind=fmt)
    if replica is not None:
        artifact = artifacts.filter(replica=replica).first()
    else:
        # The experiment's model: the replica-less artifact, else the best codistill replica.
        best = (experiment.metrics or {}).get("best_replica", 0)
        artifact = artifacts.filter(replica__isnull=True).first() or artifacts.filter(replica=best).first()
    if artifact is None:
        which = f" for replica {replica}" if replica is not None else ""
        raise ApiError(
            f"experiment {experiment.pk} has no {fmt} file{which} (status: {experiment.status})", 404
        )
    suffix = "" if replica is None else f"-replica{replica}"
    filename = f"{_slug(experiment.name)}-{experiment.pk}{suffix}.{DOWNLOAD_FORMATS[fmt]}"
    try:
        handle = artifact.file.open("rb")
    except FileNotFoundError:
        raise ApiError(f"the {fmt} file of experiment {experiment.pk} is missing from storage", 404) from None
    return FileResponse(
        handle, as_attachment=True, filename=filename, content_type="application/octet-stream"
    )


# --- compare ----------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


@api_view(["GET"])
def compare(request: HttpRequest) -> HttpResponse:
    raw = request.GET.get("ids", "")
    try:
        ids = list(dict.fromkeys(int(part) for part in raw.split(",") if part.strip()))
    except ValueError:
        raise ApiError(f"'ids' must be comma-separated experiment ids; got {raw!r}") from None
    if not ids:
        raise ApiError("'ids' is required, e.g. ?ids=1,2,3")
    if len(ids) > MAX_COMPARE:
        raise ApiError(f"compare at most {MAX_COMPARE} experiments at once")
    in_range = [i for i in ids if 0 < i <= MAX_ID]  # others cannot exist, and the database refuses them
    found = {e.pk: e for e in Experiment.objects.filter(owner=request.user, pk__in=in_range)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ApiError(f"experiment {missing[0]} not found", 404)
    rows = [found[i] for i in ids]
    max_points = _int_param(request, "max_points", 500, 2, 100_000)
    flat = {e.pk: _flatten(e.config) for e in rows}
    keys = sorted(set().union(*flat.values()))
    differences = {}
    for key in keys:
        values = {e.pk: flat[e.pk].get(key) for e in rows}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            differences[key] = {str(pk): v for pk, v in values.items()}
    return JsonResponse(
        _finite(
            {
                "experiments": [
                    {
                        "id": e.pk,
                        "name": e.name,
                        "kind": e.kind,
                        "status": e.status,
                        "config": e.config,
                        "metrics": e.metrics,
                    }
                    for e in rows
                ],
                "config_differences": differences,
                "metrics": {str(e.pk): e.metrics for e in rows},
                "series": {str(e.pk): series_of(e, max_points=max_points) for e in rows},
            }
        )
    )


# --- health -----------------------------------------------------------------------------------


def _health_error(part: str, exc: Exception) -> str:
    """The reason a part failed: in full while DEBUG, else only its kind (the text names hosts and users)."""
    log.warning("healthz: %s failed: %s", part, exc)
    return f"error: {exc}" if settings.DEBUG else f"error: {type(exc).__name__}"


# The last /healthz answer per configuration: (monotonic time, body, status). A Celery ping always waits
# its whole timeout, so probing on every call would let anyone hold the sync thread with a flood of GETs.
_health_cache: dict[tuple, tuple[float, dict[str, Any], int]] = {}
_health_lock = threading.Lock()


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database, Redis and enough Celery workers answer; else 503 naming what failed.

    The answer is reused for KD_HEALTHZ_CACHE_S seconds; callers arriving during a probe wait for it.
    """
    key = (settings.REDIS_URL, settings.CELERY_BROKER_URL, settings.KD_HEALTHZ_MIN_WORKERS, settings.DEBUG)
    with _health_lock:
        hit = _health_cache.get(key)
        if hit is None or time.monotonic() - hit[0] >= settings.KD_HEALTHZ_CACHE_S:
            body, status = _check_health()
            _health_cache.clear()
            _health_cache[key] = hit = (time.monotonic(), body, status)
    return JsonResponse(hit[1], status=hit[2])


def _check_health() -> tuple[dict[str, Any], int]:
    body: dict[str, Any] = {}
    failed = []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        body["db"] = "ok"
    except Exception as exc:  # noqa: BLE001
        body["db"] = _health_error("db", exc)
        failed.append("db")
    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1).ping()
        body["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        body["redis"] = _health_error("redis", exc)
        failed.append("redis")
    workers = 0
    if "redis" not in failed or not settings.CELERY_BROKER_URL.startswith(("redis", "rediss")):
        try:
            workers = len(celery_app.control.ping(timeout=0.5) or [])
        except Exception as exc:  # noqa: BLE001
            body["workers_error"] = _health_error("workers", exc)
    body["workers"] = workers
    if workers < settings.KD_HEALTHZ_MIN_WORKERS:
        failed.append("workers")
    if failed:
        body["error"] = f"unhealthy: {', '.join(failed)}"
        return body, 503
    return body, 200


@api_view(["GET"])
def architectures(request: HttpRequest) -> HttpResponse:
    """Student architectures for one of the user's datasets: the zoo and torchvision/timm models matching `q`,
    with parameters at its input size (and CPU latency with `latency=1`, at most 10 models then)."""
    from kd_core.models.library import describe_architectures

    dataset_id = _int_param(request, "dataset", None, 1, MAX_ID)
    if dataset_id is None:
        raise ApiError("'dataset' is required: the id of one of your datasets (shapes come from it)")
    dataset = get_object_or_404(Dataset, pk=dataset_id, owner=request.user)
    if dataset.status != Dataset.READY or not dataset.input_shape:
        raise ApiError(f"dataset {dataset.pk} is {dataset.status}; its input shape is not known yet")
    arch = request.GET.get("library") or None
    if arch not in (None, "zoo", "torchvision", "timm"):
        raise ApiError(f"'library' must be zoo, torchvision or timm; got {arch!r}")
    latency = request.GET.get("latency") in ("1", "true")
    limit = _int_param(request, "limit", 10 if latency else 20, 1, 10 if latency else 200)
    query = request.GET.get("q", "")[:100]
    body = describe_architectures(
        tuple(dataset.input_shape),
        int(dataset.num_classes or 2),
        query=query,
        arch=arch,
        limit=limit,
        latency=latency,
    )
    return JsonResponse(body)


def not_found(request: HttpRequest, path: str = "") -> JsonResponse:
    hint = "" if request.path.endswith("/") else f" (API paths end in '/': try {request.path}/)"
    return error(f"no API endpoint at {request.path}{hint}", 404)
