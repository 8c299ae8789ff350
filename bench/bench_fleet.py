"""The web tier at fleet scale, on loopback: metrics ingest, live fan-out latency, nothing lost or duplicated.

A real stack per web-process count (bench/fleet_stack.py, shared with tests/integration/test_fleet_*.py):
PostgreSQL when DATABASE_URL names a server (a private database `kd_it_<hex>`, dropped at the end; SQLite
otherwise), a private redis-server, uvicorn with the production command (tests/stack.py WEB_CMD) plus
`--workers N` (and KD_BENCH_FLEET_UVICORN's extra flags). Per configuration:
- W reporting workers: processes (`--role worker`) that set up Django and log through the REAL metrics sink
  (workers/sink.py DbChannelSink) to their own experiment, `series` values per step at `rate` steps/s
  (0: as fast as the sink takes them), for at most `seconds`;
- S WebSocket clients (`--role clients` processes; real sockets, token auth), spread over the experiments;
  each one behaves like the page (webapp/static/kd/experiment.js): reads /metrics/ after connecting, merges
  live points by (series, step), on a close reconnects (jittered backoff) and reads /metrics/?since=<newest
  step - 1>; at the end the harness merges /metrics/?since=<last contiguous step> for what is still missing.
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
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import quantile
from bench.fleet_stack import ROOT, Sampler, count_rows, make_experiments, proc_stat, start_stack


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


def series_names(series: int, width: int = 0) -> list[str]:
    """The workers' series: s0, s1, ... padded with "_" to `width` characters (larger frames per value)."""
    return [f"s{i}".ljust(width, "_") for i in range(series)]


# ---- worker role: the real sink ----------------------------------------------------------------------------
def worker_main(args: argparse.Namespace) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    django.setup()
    from workers.sink import DbChannelSink

    sink = DbChannelSink(args.experiment)
    names = series_names(args.series, args.name_width)
    start, t0 = time.time(), time.monotonic()
    steps = 0
    for step in range(args.steps):
        if args.rate > 0:
            wait = t0 + step / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        if time.monotonic() - t0 > args.seconds:
            break
        sink.log(step, {name: step + i / 7 for i, name in enumerate(names)})
        steps = step + 1
    sink.close()
    out = {"experiment": args.experiment, "steps": steps, "rows": sink.rows_written, "start": start,
           "end": time.time(), "peak_buffered": sink.peak_buffered, "live_dropped": sink.live_dropped}  # fmt: skip
    Path(args.out).write_text(json.dumps(out))


def spawn_worker(
    stack: Any,
    experiment: int,
    *,
    steps: int,
    rate: float,
    series: int,
    seconds: float,
    out: Path,
    name_width: int = 0,
    log: Path | None = None,
) -> subprocess.Popen:
    """A reporting worker process (`--role worker`): the real sink, its totals written to `out` at the end
    (its output to the file `log` when given)."""
    cmd = [sys.executable, "-m", "bench.bench_fleet", "--role", "worker", "--experiment", str(experiment),
           "--steps", str(steps), "--rate", str(rate), "--series", str(series), "--seconds", str(seconds),
           "--name-width", str(name_width), "--out", str(out)]  # fmt: skip
    if log is None:
        return subprocess.Popen(cmd, cwd=ROOT, env=stack.env)
    with open(log, "ab") as sink_log:
        return subprocess.Popen(cmd, cwd=ROOT, env=stack.env, stdout=sink_log, stderr=subprocess.STDOUT)


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
        self.history_loaded = False
        self.history_reads: list[int | None] = []  # the `since` of each read on (re)connect

    def _fetch(self, since: int | None) -> dict:
        query = "" if since is None else f"?since={since}"
        req = urllib.request.Request(
            f"{self.url}/api/experiments/{self.experiment}/metrics/{query}",
            headers={"Authorization": f"Token {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    async def merge_history(self, since: int | None) -> bool:
        try:
            body = await asyncio.to_thread(self._fetch, since)
        except (OSError, ValueError):
            return False  # the next reconnect, or the final merge, reads it again
        for name, points in body.get("series", {}).items():
            self.history.update((name, int(p[0])) for p in points)
        return True

    def resume_step(self) -> int | None:
        """Like the page (webapp/static/kd/experiment.js resumeStep): after a reconnect, read the steps after
        the oldest "newest step" among the series that came live, less one; the whole history until one full
        read succeeded."""
        if not self.history_loaded:
            return None
        newest: dict[str, int] = {}
        for name, step in (*self.seen, *self.history):
            newest[name] = max(step, newest.get(name, step))
        live = {name for name, _ in self.seen} or set(newest)
        last = min((newest[name] for name in live if name in newest), default=None)
        return None if last is None else max(-1, last - 1)

    def _take(self, points: list[dict], now: float) -> None:
        for p in points:
            for name in p.get("values") or {}:
                key = (name, int(p["step"]))
                count = self.seen.get(key, 0)
                self.seen[key] = count + 1
                if count == 0 and "time" in p:
                    self.latencies.append(now - float(p["time"]))

    async def run(self, stop: asyncio.Event, deadline: float) -> None:
        import random

        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, WebSocketException

        ws_url = self.url.replace("http://", "ws://", 1) + f"/ws/experiments/{self.experiment}/"
        headers = {"Authorization": f"Token {self.token}"}
        backoff = 0.5
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                async with connect(ws_url, additional_headers=headers, max_size=2**24, open_timeout=30) as ws:
                    self.connected.set()
                    backoff = 0.5
                    # Like the page: the history (after a reconnect, what was missed) merged with live points.
                    since = self.resume_step()
                    self.history_reads.append(since)
                    if await self.merge_history(since) and since is None:
                        self.history_loaded = True
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
            except (WebSocketException, OSError, TimeoutError) as exc:
                # Closed (4408, 4409, a restart) or refused (HTTP 500 while Redis is down): back off, reconnect.
                code = getattr(getattr(exc, "rcvd", None), "code", None)
                key = str(code or type(exc).__name__)
                self.closes[key] = self.closes.get(key, 0) + 1
                self.reconnects += 1
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 8.0)

    @staticmethod
    async def _close_when(ws: Any, stop: asyncio.Event, deadline: float) -> None:
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        await ws.close()

    def complete(self, expected: set[tuple[str, int]]) -> bool:
        return expected.issubset(self.seen.keys())


def expected_points(steps: int, series: int, width: int = 0) -> set[tuple[str, int]]:
    return {(name, s) for s in range(steps) for name in series_names(series, width)}


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
    expected = {int(e): expected_points(int(n), args.series) for e, n in totals.items()}
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


# ---- the orchestrator (the stack itself: bench/fleet_stack.py) ---------------------------------------------
def run_config(stack: Any, cfg: Config, tmp: Path) -> dict[str, Any]:
    ids = make_experiments(stack, cfg.workers)
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
    redis_cpu0 = proc_stat(stack.redis_pid)[0]
    with sampler:
        workers = [
            spawn_worker(stack, e, steps=steps, rate=cfg.rate, series=cfg.series, seconds=cfg.seconds,
                         out=run_dir / f"w{e}.json")
            for e in ids
        ]  # fmt: skip
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
    redis_cpu = (proc_stat(stack.redis_pid)[0] - redis_cpu0) / max(1e-9, time.monotonic() - sampler.t0)
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
    db = count_rows(stack, ids)
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
        "latency_p50_s": quantile(lat, 0.5),
        "latency_p95_s": quantile(lat, 0.95),
        "latency_p99_s": quantile(lat, 0.99),
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
    for name in ("--experiment", "--steps", "--sockets", "--series", "--name-width"):
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
            stack = start_stack(tmp / f"web{web_count}", web_count)
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
