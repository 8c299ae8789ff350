"""The web tier at fleet scale, on loopback: metrics ingest, live fan-out latency, nothing lost or duplicated.

A real stack per web-process count: PostgreSQL when DATABASE_URL names a server (a private database
`kd_fleet_<hex>`, dropped at the end; SQLite otherwise), a private redis-server, uvicorn with the production
command (tests/stack.py WEB_CMD) plus `--workers N`. Per configuration:
- W reporting workers: processes (`--role worker`) that set up Django and log through the REAL metrics sink
  (workers/sink.py DbChannelSink) to their own experiment, `series` values per step at `rate` steps/s
  (0: as fast as the sink takes them), for at most `seconds`;
- S WebSocket clients (`--role clients` processes; real sockets, token auth), spread over the experiments;
  each one reads /metrics/ after connecting (like the page), merges live points by (series, step),
  reconnects when closed, and at the end merges /metrics/?since=<last contiguous step>.
It reports points/s written to the database (rows / worker wall time), p50/p95/p99 from the trainer handing a
point to the sink to a client receiving it, web (and Redis) CPU seconds per wall second and peak RSS, and
points lost / duplicated after the merge (both must be 0; a live point received twice counts as a duplicate
delivery, harmless to the page but reported). Every wait is bounded; the harness stops by itself.

Run: `python -m bench bench_fleet` (small defaults, about 2 minutes on 2 cores) or
`python -m bench.bench_fleet [--scale K] [--seconds S] [--web 1,2] [--only 'NAME;...']`.
Results: bench/results/bench_fleet.json (KD_BENCH_FLEET_TAG=x writes bench_fleet-x.json) and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Config:
    name: str
    web: int  # uvicorn processes behind one port
    workers: int  # reporting worker processes, one experiment each
    sockets: int  # WebSocket clients, round-robin over the experiments
    rate: float  # logged steps/s per worker (0: unthrottled)
    series: int  # values per step
    seconds: float  # each worker logs for at most this long


def default_configs(scale: float, seconds: float, web: list[int]) -> list[Config]:
    def n(x: int) -> int:
        return max(1, int(round(x * scale)))

    configs = [
        Config("ingest", web[0], n(2), 0, 0.0, 10, seconds),
        Config("1 job, 1 socket", web[0], 1, 1, 20.0, 10, seconds),
        Config("1 job, 200 sockets", web[0], 1, n(200), 50.0, 4, seconds),
    ]
    for w in web:
        configs.append(Config(f"fleet web={w}", w, n(8), n(100), 10.0, 10, seconds))
    return configs


# ---- worker role: the real sink ----------------------------------------------------------------------------
def worker_main(args: argparse.Namespace) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    django.setup()
    from workers.sink import DbChannelSink

    sink = DbChannelSink(args.experiment)
    names = [f"s{i}" for i in range(args.series)]
    start, t0 = time.time(), time.monotonic()
    steps = 0
    for step in range(args.steps):
        if args.rate > 0:
            wait = t0 + step / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        if time.monotonic() - t0 > args.seconds:
            break
        sink.log(step, {name: step + i / 10 for i, name in enumerate(names)})
        steps = step + 1
    sink.close()
    out = {"experiment": args.experiment, "steps": steps, "rows": sink.rows_written, "start": start,
           "end": time.time()}  # fmt: skip
    Path(args.out).write_text(json.dumps(out))


# ---- clients role: real sockets ----------------------------------------------------------------------------
class Watcher:
    """One WebSocket client of one experiment: live points merged with /metrics/ history."""

    def __init__(self, url: str, token: str, experiment: int) -> None:
        self.url, self.token, self.experiment = url, token, experiment
        self.seen: dict[tuple[str, int], int] = {}  # live deliveries per point
        self.history: set[tuple[str, int]] = set()
        self.latencies: list[float] = []
        self.reconnects = 0
        self.closes: dict[str, int] = {}
        self.messages = 0
        self.connected = asyncio.Event()

    def _fetch(self, since: int | None) -> dict:
        query = "" if since is None else f"?since={since}"
        req = urllib.request.Request(
            f"{self.url}/api/experiments/{self.experiment}/metrics/{query}",
            headers={"Authorization": f"Token {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    async def merge_history(self, since: int | None) -> None:
        try:
            body = await asyncio.to_thread(self._fetch, since)
        except OSError:
            return  # the next reconnect, or the final merge, reads it again
        for name, points in body.get("series", {}).items():
            self.history.update((name, int(p[0])) for p in points)

    def _take(self, points: list[dict], now: float) -> None:
        for p in points:
            for name in p.get("values") or {}:
                key = (name, int(p["step"]))
                count = self.seen.get(key, 0)
                self.seen[key] = count + 1
                if count == 0 and "time" in p:
                    self.latencies.append(now - float(p["time"]))

    async def run(self, stop: asyncio.Event, deadline: float) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        ws_url = self.url.replace("http://", "ws://", 1) + f"/ws/experiments/{self.experiment}/"
        headers = {"Authorization": f"Token {self.token}"}
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                async with connect(ws_url, additional_headers=headers, max_size=2**24, open_timeout=30) as ws:
                    self.connected.set()
                    # Like the page: history first (merged), then live points.
                    await self.merge_history(None)
                    # One plain receive loop (cheap: the client must not be the bottleneck it measures); a
                    # watcher closes the socket at the stop or the deadline.
                    watcher = asyncio.create_task(self._close_when(ws, stop, deadline))
                    try:
                        async for raw in ws:
                            now = time.time()
                            self.messages += 1
                            msg = json.loads(raw)
                            if msg.get("type") == "metric":
                                self._take([msg], now)
                            elif msg.get("type") == "metrics":
                                self._take(msg.get("points") or [], now)
                    finally:
                        watcher.cancel()
                    if stop.is_set() or time.monotonic() >= deadline:
                        return
                    raise ConnectionClosed(ws.close_rcvd, ws.close_sent)
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                code = getattr(getattr(exc, "rcvd", None), "code", None)
                self.closes[str(code or type(exc).__name__)] = (
                    self.closes.get(str(code or type(exc).__name__), 0) + 1
                )
                self.reconnects += 1
                await asyncio.sleep(0.5)

    @staticmethod
    async def _close_when(ws: Any, stop: asyncio.Event, deadline: float) -> None:
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        await ws.close()

    def complete(self, expected: set[tuple[str, int]]) -> bool:
        return expected.issubset(self.seen.keys())


def _expected(steps: int, series: int) -> set[tuple[str, int]]:
    return {(f"s{i}", s) for s in range(steps) for i in range(series)}


async def _clients(args: argparse.Namespace) -> dict[str, Any]:
    experiments = [int(e) for e in args.experiments.split(",")]
    deadline = time.monotonic() + args.deadline
    stop = asyncio.Event()
    watchers = [Watcher(args.url, args.token, experiments[i % len(experiments)]) for i in range(args.sockets)]
    tasks = []
    for i, w in enumerate(watchers):
        tasks.append(asyncio.create_task(w.run(stop, deadline)))
        if i % 25 == 24:
            await asyncio.sleep(0.05)  # a gentler handshake storm
    try:
        await asyncio.wait_for(asyncio.gather(*(w.connected.wait() for w in watchers)), timeout=args.deadline)
    except TimeoutError:
        pass
    Path(args.ready).write_text(str(sum(w.connected.is_set() for w in watchers)))
    # Wait for the workers' totals, then for every point live (bounded by a grace period).
    done_path = Path(args.done)
    while not done_path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    totals = json.loads(done_path.read_text()) if done_path.exists() else {}
    expected = {int(e): _expected(int(n), args.series) for e, n in totals.items()}
    grace = min(deadline, time.monotonic() + args.grace)
    while time.monotonic() < grace and not all(
        w.complete(expected.get(w.experiment, set())) for w in watchers
    ):
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    # The final merge: whatever the live stream missed comes from /metrics/?since=<last contiguous step>.
    lost = dup = unexpected = live_missing = 0
    sem = asyncio.Semaphore(8)

    async def finish(w: Watcher) -> None:
        nonlocal lost, dup, unexpected, live_missing
        want = expected.get(w.experiment, set())
        missing = want - w.seen.keys()
        live_missing += len(missing)
        if missing:
            since = min(step for _, step in missing) - 1
            async with sem:
                await w.merge_history(since)
        merged = set(w.seen) | w.history
        lost += len(want - merged)
        unexpected += len(merged - want)
        dup += sum(c - 1 for c in w.seen.values() if c > 1)

    await asyncio.gather(*(finish(w) for w in watchers))
    closes: dict[str, int] = {}
    for w in watchers:
        for k, v in w.closes.items():
            closes[k] = closes.get(k, 0) + v
    return {
        "sockets": len(watchers),
        "connected": sum(w.connected.is_set() for w in watchers),
        "latencies": [x for w in watchers for x in w.latencies],
        "messages": sum(w.messages for w in watchers),
        "lost": lost,
        "duplicate_deliveries": dup,
        "unexpected": unexpected,
        "points_not_live": live_missing,
        "reconnects": sum(w.reconnects for w in watchers),
        "closes": closes,
    }


def clients_main(args: argparse.Namespace) -> None:
    import resource

    result = asyncio.run(_clients(args))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    Path(args.out).write_text(json.dumps(result))


# ---- the orchestrator --------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of one process; (0, 0) once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE


class Sampler:
    """CPU seconds and peak RSS of a process tree (the web server and its workers), sampled every 0.25 s."""

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def pids(self) -> list[int]:
        from tests.stack import descendants

        return [self.root, *descendants(self.root)]

    def cpu(self) -> float:
        return sum(_proc_stat(p)[0] for p in self.pids())

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak_rss = max(self.peak_rss, sum(_proc_stat(p)[1] for p in self.pids()))

    def __enter__(self) -> Sampler:
        self.cpu0, self.t0 = self.cpu(), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.cpu_per_s = (self.cpu() - self.cpu0) / max(1e-9, time.monotonic() - self.t0)


def _start_stack(tmp: Path, web: int, extra_env: dict[str, str] | None = None) -> Any:
    """uvicorn (`web` processes) + private Redis + migrated database; no Celery worker (the bench is one)."""
    from tests.stack import WEB_CMD, Stack, _postgres_database, free_port
    from webapp import redis_server

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KD_", "DJANGO_", "WEB_CONCURRENCY"))}
    env.update(
        DJANGO_SETTINGS_MODULE="webapp.settings",
        MEDIA_ROOT=str(tmp / "media"),
        KD_STATE_DIR=str(tmp / "state"),
        SECRET_KEY="bench-fleet-" + secrets.token_hex(8),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        KD_HEALTHZ_MIN_WORKERS="0",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    for key in ("KD_SINK_FLUSH_MS", "KD_CHANNEL_LAYER"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    env.update(extra_env or {})
    stack = Stack(tmp_dir=tmp, url=f"http://127.0.0.1:{port}", port=port, redis_url="", env=env)
    try:
        db_url = os.environ.get("DATABASE_URL", "")
        if db_url.startswith(("postgres://", "postgresql://")):
            env["DATABASE_URL"], drop = _postgres_database(db_url)
            stack._cleanups.append(drop)
        else:
            env["DATABASE_URL"] = f"sqlite:///{tmp / 'db.sqlite3'}"
        server = redis_server.start(tmp / "redis", persist=False, reuse=False)
        stack.redis_url = env["REDIS_URL"] = server.url
        stack.redis_pid = server.pid
        stack._cleanups.append(server.stop)
        stack.manage("migrate", "--noinput", timeout=300)
        cmd = [a.replace("{port}", str(port)) for a in WEB_CMD]
        if web > 1:
            cmd[-1:-1] = ["--workers", str(web)]
        stack._spawn("web", cmd)
        stack.wait_healthy(workers=0)
        stack.token = stack.make_user("fleet", "pw-" + secrets.token_hex(8))
    except BaseException:
        stack.stop()
        raise
    return stack


_MAKE = """
import json, os
from django.contrib.auth import get_user_model
from webapp.studio.models import Experiment
u = get_user_model().objects.get(username="fleet")
ids = [Experiment.objects.create(owner=u, name=f"fleet {i}", kind="train", config={"kind": "train"},
       status=Experiment.RUNNING).pk for i in range(int(os.environ["KD_FLEET_N"]))]
print(json.dumps(ids))
"""

_COUNT = """
import json, os
from django.db.models import Count
from webapp.studio.models import MetricPoint
ids = json.loads(os.environ["KD_FLEET_IDS"])
rows = MetricPoint.objects.filter(experiment_id__in=ids)
dups = rows.values("experiment_id", "name", "step").annotate(n=Count("id")).filter(n__gt=1).count()
print(json.dumps({"rows": rows.count(), "duplicate_rows": dups}))
"""


def _shell(stack: Any, code: str, **env: str) -> Any:
    res = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env={**stack.env, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_config(stack: Any, cfg: Config, tmp: Path) -> dict[str, Any]:
    ids = _shell(stack, _MAKE, KD_FLEET_N=str(cfg.workers))
    run_dir = Path(tempfile.mkdtemp(dir=tmp, prefix="run-"))
    steps = int(cfg.rate * cfg.seconds) + 1 if cfg.rate > 0 else 10**9
    deadline = cfg.seconds + 90
    env = {**stack.env}
    py = [sys.executable, "-m", "bench.bench_fleet"]
    client_procs = []
    per_proc = 250
    n_procs = (cfg.sockets + per_proc - 1) // per_proc if cfg.sockets else 0
    for k in range(n_procs):
        count = cfg.sockets // n_procs + (1 if k < cfg.sockets % n_procs else 0)
        # Rotate the experiment list so sockets spread evenly over experiments across processes.
        mine = ids[k % len(ids) :] + ids[: k % len(ids)]
        client_procs.append(subprocess.Popen(
            [*py, "--role", "clients", "--url", stack.url, "--token", stack.token,
             "--experiments", ",".join(map(str, mine)), "--sockets", str(count), "--series", str(cfg.series),
             "--deadline", str(deadline), "--grace", "10", "--ready", str(run_dir / f"ready{k}"),
             "--done", str(run_dir / "done.json"), "--out", str(run_dir / f"clients{k}.json")],
            cwd=ROOT, env=env,
        ))  # fmt: skip
    wait_until = time.monotonic() + 60
    while time.monotonic() < wait_until and not all((run_dir / f"ready{k}").exists() for k in range(n_procs)):
        time.sleep(0.1)
    sampler = Sampler(stack.procs["web"].pid)
    redis_cpu0 = _proc_stat(stack.redis_pid)[0]
    with sampler:
        workers = [
            subprocess.Popen(
                [
                    *py,
                    "--role",
                    "worker",
                    "--experiment",
                    str(e),
                    "--steps",
                    str(steps),
                    "--rate",
                    str(cfg.rate),
                    "--series",
                    str(cfg.series),
                    "--seconds",
                    str(cfg.seconds),
                    "--out",
                    str(run_dir / f"w{e}.json"),
                ],
                cwd=ROOT,
                env=env,
            )  # fmt: skip
            for e in ids
        ]
        for w in workers:
            try:
                w.wait(timeout=max(1.0, cfg.seconds + 60))
            except subprocess.TimeoutExpired:
                w.kill()
        reports = [
            json.loads((run_dir / f"w{e}.json").read_text()) for e in ids if (run_dir / f"w{e}.json").exists()
        ]
        (run_dir / "done.json").write_text(json.dumps({r["experiment"]: r["steps"] for r in reports}))
        for p in client_procs:
            try:
                p.wait(timeout=deadline + 30)
            except subprocess.TimeoutExpired:
                p.kill()
    redis_cpu = (_proc_stat(stack.redis_pid)[0] - redis_cpu0) / max(1e-9, time.monotonic() - sampler.t0)
    clients: dict[str, Any] = {"latencies": [], "lost": 0, "duplicate_deliveries": 0, "unexpected": 0,
                               "points_not_live": 0, "reconnects": 0, "messages": 0, "connected": 0, "closes": {}}  # fmt: skip
    for k in range(n_procs):
        path = run_dir / f"clients{k}.json"
        if not path.exists():
            clients["lost"] = clients.get("lost", 0) + 0
            clients.setdefault("client_process_failed", 0)
            clients["client_process_failed"] += 1
            continue
        part = json.loads(path.read_text())
        for key in ("lost", "duplicate_deliveries", "unexpected", "points_not_live", "reconnects", "messages",
                    "connected"):  # fmt: skip
            clients[key] += part[key]
        clients["latencies"] += part["latencies"]
        clients["client_cpu_s"] = clients.get("client_cpu_s", 0.0) + part.get("cpu_s", 0.0)
        for c, v in part["closes"].items():
            clients["closes"][c] = clients["closes"].get(c, 0) + v
    db = _shell(stack, _COUNT, KD_FLEET_IDS=json.dumps(ids))
    logged = sum(r["steps"] * cfg.series for r in reports)
    wall = (max(r["end"] for r in reports) - min(r["start"] for r in reports)) if reports else 0.0
    lat = clients.pop("latencies")
    return {
        **asdict(cfg),
        "points_logged": logged,
        "db_rows": db["rows"],
        "db_duplicate_rows": db["duplicate_rows"],
        "db_missing_rows": logged - db["rows"],
        "ingest_points_per_s": db["rows"] / wall if wall else None,
        "worker_wall_s": wall,
        "latency_p50_s": _quantile(lat, 0.5),
        "latency_p95_s": _quantile(lat, 0.95),
        "latency_p99_s": _quantile(lat, 0.99),
        "latency_max_s": max(lat) if lat else None,
        "live_points_received": len(lat),
        "web_cpu_per_s": sampler.cpu_per_s,
        "web_peak_rss_mb": sampler.peak_rss / 2**20,
        "redis_cpu_per_s": redis_cpu,
        **clients,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=("main", "worker", "clients"), default="main")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply workers and sockets")
    parser.add_argument("--seconds", type=float, default=10.0, help="logging time per configuration")
    parser.add_argument("--web", default="1,2", help="web process counts for the fleet configuration")
    parser.add_argument("--only", default="", help="configuration names, prefix match, separated by ';'")
    # role arguments
    for name in ("--experiment", "--steps", "--sockets", "--series"):
        parser.add_argument(name, type=int, default=0)
    for name in ("--rate", "--deadline", "--grace"):
        parser.add_argument(name, type=float, default=0.0)
    for name in ("--out", "--url", "--token", "--experiments", "--ready", "--done"):
        parser.add_argument(name, default="")
    args = parser.parse_args([] if argv is None else argv)
    if args.role == "worker":
        return worker_main(args)
    if args.role == "clients":
        return clients_main(args)

    from bench.common import print_table, write_result

    web = [int(w) for w in args.web.split(",") if w]
    configs = default_configs(args.scale, args.seconds, web)
    if args.only:
        wanted = [o.strip() for o in args.only.split(";") if o.strip()]
        configs = [c for c in configs if any(c.name.startswith(w) for w in wanted)]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kd-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        for web_count in sorted({c.web for c in configs}):
            stack = _start_stack(tmp / f"web{web_count}", web_count)
            try:
                for cfg in [c for c in configs if c.web == web_count]:
                    print(
                        f"-- {cfg.name}: {cfg.workers} workers, {cfg.sockets} sockets, web={cfg.web}",
                        flush=True,
                    )
                    results.append(run_config(stack, cfg, tmp))
            finally:
                stack.stop()
    cores = os.cpu_count() or 1
    database = "postgresql" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "sqlite"
    tag = os.environ.get("KD_BENCH_FLEET_TAG", "")
    path = write_result(
        "bench_fleet" + (f"-{tag}" if tag else ""),
        {"database": database, "flush_ms": os.environ.get("KD_SINK_FLUSH_MS", "default"), "configs": results},
    )

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f}"

    print_table(
        ["config", "web", "W", "S", "pts/s DB", "pts/s/core", "p50 ms", "p95 ms", "p99 ms", "web CPU", "RSS MB",
         "lost", "dup rows", "dup live", "reconn"],
        [[r["name"], r["web"], r["workers"], r["sockets"], f"{r['ingest_points_per_s'] or 0:.0f}",
          f"{(r['ingest_points_per_s'] or 0) / cores:.0f}", ms(r["latency_p50_s"]), ms(r["latency_p95_s"]),
          ms(r["latency_p99_s"]), f"{r['web_cpu_per_s']:.2f}", f"{r['web_peak_rss_mb']:.0f}",
          r["lost"] + r["db_missing_rows"], r["db_duplicate_rows"], r["duplicate_deliveries"], r["reconnects"]]
         for r in results],
    )  # fmt: skip
    print(
        f"({database}, {cores} cores; web CPU = CPU seconds per wall second of all web processes) -> {path}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
