"""HTTP load test of the Ray Serve scoring app against its zero-work floor, measured in the same run (docs/design.md,
Serving).

    python -m bench.serve_load --out bench/out/serve.json [--quick] [--checkpoint C --index I --data D]

Self-contained: without --checkpoint/--index/--data it builds synthetic data with L = 2,000 histories, an untrained
small SEMINAR and its folded PQ index. Every request: a user with a 2,000-long history, 100 candidates.
Each ingress mode (--ingress; serve_app/deploy.py: "proxy" = Serve's HTTP proxy, "direct" = Serve's
throughput-optimized preset, clients spread over the ingress replicas' own ports) runs on its own local Ray on
127.0.0.1 only, with bounded request counts and wall time; per mode:
  1. the zero-work floor (bench/serve_variants.py: the same graph, work removed) and the production app
     (serve_app/app.py), side by side at the same fixed replica counts (--replicas), each measured only once its
     replicas run: closed loop at several concurrencies in alternating bursts; then the app alone; then a
     fixed-rate open loop on the app at half its closed-loop throughput;
  2. (first mode) the same scoring called in-process, one request at a time (the served method and "pq");
  3. (first mode) skewed loads on the bench's split topology with aggressive autoscaling: retriever-heavy, then
     scorer-heavy; replica counts of every deployment are sampled each second (replicas_over_time).
With --store log,redis the whole run repeats on each history store (the Redis one on a private redis-server,
appendfsync always, base histories bulk-loaded first); the first store gives the top-level figures, each store's
summary is under "by_store". The machine is shared and noisy: the ratios against the floor of the same run are the
figures, and every figure has the machine's load average (os.getloadavg) beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before numpy loads OpenBLAS: the in-process reference computes with one BLAS thread, as the replicas do (Ray sets
# OMP_NUM_THREADS=1 in its workers); a second thread had made the reference's GEMM cheaper than the replicas' one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

from bench.serve_variants import floor_app, split_app
from serve_app.app import compose
from serve_app.deploy import INGRESS_MODES, direct_urls, set_ingress_env

APP, FLOOR_APP = "bench", "floor"
L, CANDIDATES = 2000, 100


def percentiles(lat_s: list[float]) -> dict:
    if not lat_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ms = np.asarray(lat_s) * 1e3
    return {f"p{p}_ms": float(np.percentile(ms, p)) for p in (50, 95, 99)}


class Requests:
    """Deterministic request bodies: users with full histories, 100 random candidates, a query id or none."""

    def __init__(self, users: list[int], num_queries: int, num_items: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.bodies = [
            {
                "user_id": int(rng.choice(users)),
                "candidates": (rng.choice(num_items, CANDIDATES, replace=False) + 1).tolist(),
                "query": int(rng.integers(0, num_queries + 1)) if rng.random() < 0.3 else None,
            }
            for _ in range(256)
        ]

    def __getitem__(self, n: int) -> dict:
        return self.bodies[n % len(self.bodies)]


def _clients(urls: list[str], n: int):
    import httpx

    per_url = max(1, -(-n // len(urls)))
    limits = httpx.Limits(max_connections=per_url, max_keepalive_connections=per_url)
    return [httpx.AsyncClient(base_url=u, timeout=60, limits=limits) for u in urls]


async def closed_loop(
    urls: list[str],
    reqs: Requests,
    concurrency: int,
    max_requests: int,
    max_s: float,
    stop: asyncio.Event | None = None,
) -> dict:
    """`concurrency` workers, each sending its next request when the last one answered; worker i talks to
    urls[i % len(urls)] (direct ingress: one address per ingress replica, spread like a load balancer would)."""
    import httpx

    lat, errors, sent = [], 0, 0
    load_start = os.getloadavg()
    deadline = time.perf_counter() + max_s
    clients = _clients(urls, concurrency)

    first_error = None

    async def worker(client):
        nonlocal errors, sent, first_error
        while sent < max_requests and time.perf_counter() < deadline and not (stop and stop.is_set()):
            body = reqs[sent]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/score", json=body)
                ok = r.status_code == 200
                first_error = first_error or (None if ok else f"{client.base_url}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                ok = False
                first_error = first_error or f"{client.base_url}: {e!r}"
            lat.append(time.perf_counter() - t0) if ok else None
            errors += 0 if ok else 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    for client in clients:
        await client.aclose()
    return {
        "concurrency": concurrency,
        "requests": sent,
        "errors": errors,
        "wall_s": wall,
        "rps": len(lat) / wall,
        **percentiles(lat),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "first_error": first_error,
        "_lat": lat,
    }


def pooled(parts: list[dict]) -> dict:
    """One closed-loop result from several bursts at the same concurrency (latencies pooled, rate = ok / wall)."""
    lat = [x for p in parts for x in p.pop("_lat")]
    wall = sum(p["wall_s"] for p in parts)
    return {
        "concurrency": parts[0]["concurrency"],
        "requests": sum(p["requests"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "wall_s": wall,
        "rps": len(lat) / wall,
        "bursts": len(parts),
        "burst_rps": [p["rps"] for p in parts],
        **percentiles(lat),
        "load_avg_start": parts[0]["load_avg_start"],
        "load_avg_end": parts[-1]["load_avg_end"],
    }


async def open_loop(urls: list[str], reqs: Requests, rate: float, duration_s: float) -> dict:
    """Fixed arrival rate; latency counted from each request's scheduled time (queueing included)."""
    import httpx

    lat, errors = [], 0
    load_start = os.getloadavg()
    n = int(rate * duration_s)
    clients = _clients(urls, 64)
    start = time.perf_counter()

    async def one(i: int):
        nonlocal errors
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            r = await clients[i % len(clients)].post("/v1/score", json=reqs[i])
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        lat.append(time.perf_counter() - due) if ok else None
        errors += 0 if ok else 1

    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    for client in clients:
        await client.aclose()
    return {
        "rate": rate,
        "requests": n,
        "errors": errors,
        "wall_s": wall,
        "rps": len(lat) / wall,
        **percentiles(lat),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }


class ReplicaRecorder:
    """Polls serve.status() once a second: RUNNING and STARTING replicas per deployment, with a phase label."""

    def __init__(self, period_s: float = 1.0):
        self.samples: list[dict] = []
        self.phase, self.period = "start", period_s
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            sample = {"t_s": round(time.time() - self.t0, 2), "phase": self.phase}
            try:
                sample.update(replica_counts())
            except Exception as e:  # a status poll racing a redeploy: record it, keep polling
                sample["error"] = repr(e)
            self.samples.append(sample)
            self._stop.wait(self.period)

    def since(self, start: int) -> list[dict]:
        return [s for s in self.samples[start:] if "error" not in s]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def replica_counts(app_name: str = APP) -> dict:
    """{deployment: RUNNING, deployment_starting: STARTING (+ PENDING_ALLOCATION)} of one app."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    out: dict[str, int] = {}
    for name, d in app.deployments.items() if app is not None else ():
        states: dict[Any, int] = d.replica_states
        out[name] = states.get("RUNNING", 0)
        out[f"{name}_starting"] = states.get("STARTING", 0) + states.get("PENDING_ALLOCATION", 0)
        out[f"{name}_stopping"] = states.get("STOPPING", 0)
    return out


def deploy(app, expect: dict[str, int], max_wait_s: float = 240, name: str = APP, route_prefix: str = "/") -> float:
    """Deploy (or update in place) and wait until `expect` replicas run and none start or stop; returns the wait."""
    from ray import serve

    t0 = time.perf_counter()
    serve.run(app, name=name, route_prefix=route_prefix)
    while time.perf_counter() - t0 < max_wait_s:
        counts = replica_counts(name)
        if all(counts.get(d, 0) == n for d, n in expect.items()) and not any(
            v for k, v in counts.items() if k.endswith(("_starting", "_stopping"))
        ):
            return time.perf_counter() - t0
        time.sleep(0.5)
    raise RuntimeError(f"replicas not up after {max_wait_s} s: want {expect}, have {replica_counts(name)}")


def warm(urls: list[str], reqs: Requests, n: int) -> None:
    asyncio.run(closed_loop(urls, reqs, 2, n, 60)).pop("_lat")


class InProcessWork:
    """One request's work as the Retriever and Scorer replicas run it, called directly in this process, with the
    replicas' process settings (no HTTP, no Serve)."""

    def __init__(self, art: dict, method: str):
        from seminar_ray.data.entities import EntityTables
        from seminar_ray.retrieval.index import PQIndex
        from seminar_ray.serving import Catalog, LogHistoryStore, RetrievalStage, ScoringStage, load_serving_model
        from seminar_ray.serving.process import setup_serving_process

        setup_serving_process()
        model, _ = load_serving_model(art["checkpoint"], EntityTables.load(art["data"]))
        self.retrieval = RetrievalStage(model, PQIndex.load(art["index"], mmap=True), method=method)
        self.scoring = ScoringStage(model)
        self.store, self.catalog = LogHistoryStore(art["store"], art["data"]), Catalog.load(art["data"])

    def retrieve(self, body: dict):
        """The Retriever's part: query, history (read-your-writes), top-K → ScoreJob."""
        query_id, _ = self.catalog.resolve_query(body["query"])
        self.store.refresh()
        history = self.store.history(body["user_id"], self.retrieval.max_len)
        return self.retrieval.prepare(history, query_id, self.catalog.validate_candidates(body["candidates"]))

    def score(self, job) -> None:
        """The Scorer's part for one job."""
        self.scoring.score_batch([job])


def in_process(art, reqs: Requests, n: int, method: str) -> dict:
    """The same retrieval + scoring called directly in this process, one request at a time (no HTTP, no Serve)."""
    work = InProcessWork(art, method)
    lat: list[float] = []
    cpu: list[float] = []
    stage_s: dict[str, list[float]] = {"retrieve": [], "score": []}
    load_start = os.getloadavg()
    for i in range(n + 5):
        t0, c0 = time.perf_counter(), time.thread_time()
        job = work.retrieve(reqs[i])
        t1 = time.perf_counter()
        work.score(job)
        t2 = time.perf_counter()
        if i >= 5:
            lat.append(t2 - t0)
            cpu.append(time.thread_time() - c0)
            stage_s["retrieve"].append(t1 - t0)
            stage_s["score"].append(t2 - t1)
    return {
        "retrieval": method,
        "requests": n,
        **percentiles(lat),
        **{f"{k}_p50_ms": float(np.median(v) * 1e3) for k, v in stage_s.items()},
        "cpu_p50_ms": float(np.median(cpu) * 1e3),  # thread CPU time: what a loaded machine does not inflate
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }


def build_default_artefacts(root: Path, users: int) -> dict:
    from seminar_ray.testing.artefacts import build_artefacts

    a = build_artefacts(root, num_users=users, min_len=L, max_len=L + 1, model_max_len=L)
    return {"checkpoint": str(a.checkpoint), "index": str(a.index), "data": str(a.data), "store": str(a.store)}


STORES = ("log", "redis")


@contextmanager
def history_store(kind: str, art: dict, root: Path):
    """The `store` argument of the app for `kind`: the log directory, or a private redis-server's URL with the
    dataset's base histories bulk-loaded (stopped afterwards)."""
    if kind == "log":
        yield art["store"]
        return
    from seminar_ray.serving.redis_store import load_base
    from seminar_ray.testing.redis_local import LocalRedis

    with LocalRedis(root / "redis") as server:
        load_base(server.url, art["data"])
        yield server.url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/serve.json"))
    ap.add_argument("--quick", action="store_true", help="short runs (about 5 minutes in all)")
    ap.add_argument("--checkpoint")
    ap.add_argument("--index")
    ap.add_argument("--data")
    ap.add_argument("--port", type=int, default=18321)
    ap.add_argument("--retrieval", default="exact", choices=("exact", "pq", "sketch"))
    ap.add_argument(
        "--replicas",
        help=f"Retriever,Scorer replicas of the throughput runs in every mode (default per mode: {DEFAULT_REPLICAS})",
    )
    ap.add_argument(
        "--ingress",
        default="direct,proxy",
        help="ingress modes to measure, each on its own Ray instance (serve_app/deploy.py); the first "
        "gives the top-level figures and runs the in-process and skewed-load phases",
    )
    ap.add_argument(
        "--store",
        default="log",
        help="history stores to serve from, each a whole run: log, redis or "
        "log,redis (the first gives the top-level figures)",
    )
    args = ap.parse_args(argv)
    stores = args.store.split(",")
    if not stores or any(s not in STORES for s in stores):
        raise SystemExit(f"--store: a comma list of {STORES}, got {args.store!r}")
    modes = args.ingress.split(",")
    if not modes or any(m not in INGRESS_MODES for m in modes):
        raise SystemExit(f"--ingress: a comma list of {INGRESS_MODES}, got {args.ingress!r}")
    t_start = time.time()
    plan = Plan.make(args.quick, args.replicas)

    from seminar_ray.data.schema import DatasetMeta, read_table

    root = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    if args.checkpoint:
        art = {"checkpoint": args.checkpoint, "index": args.index, "data": args.data, "store": str(root / "history")}
    else:
        art = build_default_artefacts(root, users=24 if args.quick else 64)
    meta = DatasetMeta.load(art["data"])
    seqs = read_table(art["data"], "sequences", ["user_id", "item_ids"]).to_pydict()
    users = [u for u, items in zip(seqs["user_id"], seqs["item_ids"]) if len(items) >= L]
    if not users:
        raise SystemExit(f"{art['data']}: no user has a history of {L}; pass data with long histories or none")
    reqs = Requests(users, meta.num_queries, meta.num_items)
    result: dict = {
        "candidates": CANDIDATES,
        "L": L,
        "quick": args.quick,
        "headline_concurrency": plan.headline,
        "retrieval": args.retrieval,
        "load_avg_before": os.getloadavg(),
        "artefacts_s": time.time() - t_start,
        "replicas_over_time": [],
        "modes": {},
        "stores": stores,
        "by_store": {},
    }
    runs: dict[str, dict] = {}
    for k, store in enumerate(stores):
        with history_store(store, art, root) as store_arg:
            base = {**art, "store": store_arg, "limits": {"max_candidates": 200}, "retrieval": args.retrieval}
            runs[store] = {}
            for i, mode in enumerate(modes):
                run = run_mode(mode, args.port, base, reqs, plan, first=i == 0 and k == 0)
                result["replicas_over_time"] += run.pop("replica_samples")
                runs[store][mode] = run
    result["modes"] = runs[stores[0]]
    head = result["modes"][modes[0]]
    inproc = head["inprocess"][args.retrieval]
    for store_runs in runs.values():
        for run in store_runs.values():
            run.update(summarise(run, inproc["p50_ms"], inproc["cpu_p50_ms"], plan.headline))
    result["by_store"] = {
        store: {m: {k: r[k] for k in SUMMARY_KEYS} for m, r in store_runs.items()} for store, store_runs in runs.items()
    }
    skew = head["skew"]
    head["targets"].update(
        {
            "retriever_heavy_scaled_only_retriever": skew["retriever_heavy"]["scaled"] == ["Retriever"],
            "scorer_heavy_scaled_only_scorer": skew["scorer_heavy"]["scaled"] == ["Scorer"],
            "heavy_stage_scaled_first_both_ways": (
                skew["retriever_heavy"]["first_to_scale"] == "Retriever"
                and skew["scorer_heavy"]["first_to_scale"] == "Scorer"
            ),
        }
    )
    meeting = [m for m, r in result["modes"].items() if r["targets"]["rps_and_p99_and_zero_errors"]]
    result.update(
        {k: head[k] for k in SUMMARY_KEYS},
        ingress=modes[0],
        targets=head["targets"],
        inprocess=head["inprocess"],
        skew=head["skew"],
        mode_meeting_targets=meeting[0] if meeting else None,
        modes_meeting_targets=meeting,
    )
    result["load_avg_after"] = os.getloadavg()
    result["wall_s"] = time.time() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot_replicas(result, args.out.with_suffix(".png"))
    print(
        json.dumps(
            {
                "load_avg_before": result["load_avg_before"],
                "load_avg_after": result["load_avg_after"],
                "by_store": result["by_store"],
                "wall_s": result["wall_s"],
                "mode_meeting_targets": result["mode_meeting_targets"],
                **{
                    m: {**{k: r[k] for k in SUMMARY_KEYS if k != "requests"}, "targets": r["targets"]}
                    for m, r in result["modes"].items()
                },
                "skew": {k: v["mean_running_plus_starting"] for k, v in head["skew"].items() if k.endswith("_heavy")},
            },
            indent=1,
        )
    )
    return 0


def plot_replicas(result: dict, path: Path) -> None:
    """Running replicas of each deployment over time in the skewed-load phases (one panel per phase)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ("retriever_heavy", "scorer_heavy")
    fig, axes = plt.subplots(1, len(phases), figsize=(11, 3.6), sharey=True)
    for ax, phase in zip(axes, phases):
        samples = [s for s in result["replicas_over_time"] if s["phase"].endswith(f"skew_{phase}") and "error" not in s]
        if not samples:
            continue
        t0 = samples[0]["t_s"]
        t = [s["t_s"] - t0 for s in samples]
        for name, color in (("Retriever", "tab:blue"), ("Scorer", "tab:orange")):
            ax.step(t, [s.get(name, 0) for s in samples], "-", color=color, where="post", label=f"{name} running")
            ax.step(
                t,
                [s.get(name, 0) + s.get(f"{name}_starting", 0) for s in samples],
                ":",
                color=color,
                where="post",
                label=f"{name} running + starting",
            )
        ax.set_yticks([1, 2, 3])
        ax.set_title(f"{phase.replace('_', '-')} load (extra {SKEW_EXTRA_MS:.0f} ms CPU on that stage)")
        ax.set_xlabel("seconds into the phase")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("replicas")
    axes[0].legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SUMMARY_KEYS = (
    "rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "errors",
    "requests",
    "floor_rps",
    "floor_p99_ms",
    "inprocess_p50_ms",
    "c1_p50_ms",
    "floor_c1_p50_ms",
    "alone_rps",
    "alone_p99_ms",
    "load_avg_1m_during",
)


# Fixed replica counts of the throughput runs (Retriever, Scorer) per ingress mode, the better count of each mode on
# this 2-core machine (serve_app/README.md): the proxy mode gains from a second ingress replica, the direct mode,
# whose ingress replicas also parse HTTP, from one process fewer.
DEFAULT_REPLICAS = {"proxy": (2, 1), "direct": (1, 1)}


@dataclass
class Plan:
    """Request counts and limits per phase (bounded in requests and seconds), replica counts per mode."""

    quick: bool
    levels: list[int]
    headline: int
    replicas: dict[str, tuple[int, int]]
    open_s: float
    bursts: int = 4  # alternating floor/real bursts per concurrency

    @classmethod
    def make(cls, quick: bool, replicas: str | None) -> Plan:
        fixed = DEFAULT_REPLICAS
        if replicas:
            r, s = (int(x) for x in replicas.split(","))
            fixed = {m: (r, s) for m in INGRESS_MODES}
        return cls(quick, [1, 8] if quick else [1, 2, 4, 8, 16], 8, fixed, 6 if quick else 20)

    def limits(self, concurrency: int) -> dict:
        if concurrency == 1:
            return dict(max_requests=120 if self.quick else 300, max_s=8 if self.quick else 30)
        return dict(max_requests=600 if self.quick else 2000, max_s=10 if self.quick else 30)


def run_mode(mode: str, port: int, base: dict, reqs: Requests, plan: Plan, first: bool) -> dict:
    """One ingress mode on its own local Ray: floor and real app (merged, fixed replicas) at each concurrency, an
    open loop; on the first mode also the in-process baseline and the skewed-load autoscaling runs."""
    import ray
    from ray import serve

    set_ingress_env(mode)
    # A replaced direct-ingress replica drains 30 s by default (clients of its port move on); the bench redeploys
    # between phases and waits for old replicas to stop, so it drains for 2 s.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    proxy_url = [f"http://127.0.0.1:{port}"]
    n_ret, n_sco = plan.replicas[mode]
    expect = {"Retriever": n_ret, "Scorer": n_sco}
    fixed = {d: {"num_replicas": n, "autoscaling_config": None} for d, n in expect.items()}

    def endpoints(app: str, prefix: str) -> list[str]:
        urls = direct_urls(app) if mode == "direct" else proxy_url
        if not urls:
            raise RuntimeError(f"{mode} ingress: the controller lists no HTTP target for app {app!r}")
        return [u + prefix for u in urls]

    def pair(label: str, rec: ReplicaRecorder, levels: list[int]) -> tuple[dict, dict]:
        """The zero-work floor (app "floor" under /floor) and the real app side by side, same graph and replicas;
        at each concurrency alternating bursts floor, real, floor, real, ... pooled per side, so a drift in the
        machine's load hits both alike (sequential phases swung the ratio between runs; serve_app/README.md)."""
        rec.phase = f"{mode}/{label}:deploy"
        waits = {
            "floor": deploy(floor_app(fixed), expect, name=FLOOR_APP, route_prefix="/floor"),
            "real": deploy(compose(base, fixed), expect),
        }
        urls = {"floor": endpoints(FLOOR_APP, "/floor"), "real": endpoints(APP, "")}
        rec.phase = f"{mode}/{label}:warmup"
        for side in urls.values():
            warm(side, reqs, 30)
        out: dict[str, dict[str, Any]] = {k: {"deploy_wait_s": waits[k], "urls": urls[k], "closed": []} for k in urls}
        for c in levels:
            lim = plan.limits(c)
            parts: dict[str, list[dict]] = {"floor": [], "real": []}
            for _ in range(plan.bursts):
                for k in parts:
                    rec.phase = f"{mode}/{label}:{k}_c{c}"
                    parts[k].append(
                        asyncio.run(
                            closed_loop(
                                urls[k], reqs, c, lim["max_requests"] // plan.bursts, lim["max_s"] / plan.bursts
                            )
                        )
                    )
            for k in parts:
                out[k]["closed"].append(pooled(parts[k]))
        serve.delete(FLOOR_APP)
        return out["floor"], out["real"]

    with ReplicaRecorder() as rec:
        floor, real = pair("merged", rec, plan.levels)
        real_head = at(real, plan.headline)
        rec.phase = f"{mode}/real_merged:alone"  # the app as deployed on its own, the idle floor app gone
        real["alone"] = asyncio.run(closed_loop(real["urls"], reqs, plan.headline, **plan.limits(plan.headline)))
        real["alone"].pop("_lat")
        rec.phase = f"{mode}/real_merged:open"
        real["open"] = asyncio.run(open_loop(real["urls"], reqs, round(0.5 * real_head["rps"], 1), plan.open_s))
        out = {"replicas": expect, "floor": floor, "real": real}
        if first:
            rec.phase = f"{mode}/inprocess"
            out["inprocess"] = {
                m: in_process(base, reqs, 40 if plan.quick else 200, m)
                for m in dict.fromkeys([base["retrieval"], "pq"])
            }
            out["skew"] = skewed_runs(proxy_url, reqs, base, rec, max_s=35 if plan.quick else 90)
        out["topology"] = {"merged": {"floor": at(floor, plan.headline), "real": real_head}}
    serve.shutdown()
    ray.shutdown()
    return {**out, "replica_samples": rec.samples}


def summarise(run: dict, inproc_p50_ms: float, inproc_cpu_ms: float, headline: int) -> dict:
    """The issue's figures and targets for one mode (floor and real from the same Ray instance)."""
    floor, real = run["floor"], run["real"]
    head, floor_head, c1 = at(real, headline), at(floor, headline), at(real, 1)
    s = {
        "rps": head["rps"],
        "p50_ms": head["p50_ms"],
        "p95_ms": head["p95_ms"],
        "p99_ms": head["p99_ms"],
        "errors": sum(r["errors"] for r in (*real["closed"], real["open"], real["alone"])),
        "requests": sum(r["requests"] for r in (*real["closed"], real["open"], real["alone"])),
        "floor_rps": floor_head["rps"],
        "floor_p99_ms": floor_head["p99_ms"],
        "inprocess_p50_ms": inproc_p50_ms,
        "inprocess_cpu_p50_ms": inproc_cpu_ms,
        "c1_p50_ms": c1["p50_ms"],
        "floor_c1_p50_ms": at(floor, 1)["p50_ms"],
        "alone_rps": real["alone"]["rps"],
        "alone_p99_ms": real["alone"]["p99_ms"],
    }
    s["targets"] = {
        "rps_ratio_vs_floor": s["rps"] / s["floor_rps"],
        "rps_ge_0.8_floor": s["rps"] >= 0.8 * s["floor_rps"],
        "p99_minus_floor_p99_ms": s["p99_ms"] - s["floor_p99_ms"],
        "p99_le_floor_p99_plus_20ms": s["p99_ms"] <= s["floor_p99_ms"] + 20,
        "zero_errors": s["errors"] == 0,
        "c1_p50_minus_inprocess_ms": s["c1_p50_ms"] - inproc_p50_ms,
        "c1_within_5ms_of_inprocess": s["c1_p50_ms"] - inproc_p50_ms <= 5,
        "floor_c1_p50_minus_inprocess_ms": s["floor_c1_p50_ms"] - inproc_p50_ms,
        "c1_p50_minus_floor_c1_p50_ms": s["c1_p50_ms"] - s["floor_c1_p50_ms"],
        # Serve's hops add nothing beyond the floor's: the app's extra time at c = 1 is its in-process work (+1 ms)
        "c1_extra_le_inprocess_plus_1ms": s["c1_p50_ms"] - s["floor_c1_p50_ms"] <= inproc_p50_ms + 1,
        # the same with the in-process thread CPU time: on a loaded machine the in-process wall time is inflated
        "c1_extra_le_inprocess_cpu_plus_1ms": s["c1_p50_ms"] - s["floor_c1_p50_ms"] <= inproc_cpu_ms + 1,
        "stretch_100_rps": s["alone_rps"] >= 100,  # the app alone: no idle floor app beside it
    }
    s["targets"]["rps_and_p99_and_zero_errors"] = (
        s["targets"]["rps_ge_0.8_floor"] and s["targets"]["p99_le_floor_p99_plus_20ms"] and s["targets"]["zero_errors"]
    )
    s["load_avg_1m_during"] = [
        min(r["load_avg_start"][0] for r in (*floor["closed"], *real["closed"])),
        max(r["load_avg_end"][0] for r in (*floor["closed"], *real["closed"])),
    ]
    return s


def at(phase: dict, concurrency: int) -> dict:
    return next(r for r in phase["closed"] if r["concurrency"] == concurrency)


SKEW_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_ongoing_requests": 4,
    "upscale_delay_s": 1,
    "downscale_delay_s": 4,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}
SKEW_EXTRA_MS = 40.0
SKEW_CONCURRENCY = 12


def skewed_runs(urls: list[str], reqs: Requests, base: dict, rec: ReplicaRecorder, max_s: float) -> dict:
    """Independent autoscaling: the bench's split topology (serve_variants.split_app: each deployment's ongoing-request
    count is its own work), Retriever and Scorer autoscaled 1..3; one made heavy with extra_cpu_ms (the natural work
    of both stages is a few ms, too little to saturate either on 2 cores), then the other. Each phase starts at 1
    replica each and runs until the heavy deployment has run 3 replicas for 3 s (or max_s); `scaled` names the
    deployments the autoscaler took above 1 replica
    (running + starting: a replica start is slow on a loaded shared machine).

    Between phases the app is redeployed: with the Python API, Serve gives every `serve.run` a new code version and
    rolls all replicas (only `serve deploy` of a config reconfigures in place), so each phase starts from 1 + 1."""
    scaling = {d: {"autoscaling_config": SKEW_AUTOSCALING} for d in ("Retriever", "Scorer")}
    out = {"autoscaling_config": SKEW_AUTOSCALING, "concurrency": SKEW_CONCURRENCY, "extra_cpu_ms": SKEW_EXTRA_MS}
    phases = (
        ("retriever_heavy", "Retriever", {"retriever_extra_cpu_ms": SKEW_EXTRA_MS}),
        ("scorer_heavy", "Scorer", {"scorer_extra_cpu_ms": SKEW_EXTRA_MS}),
    )
    for name, heavy, extra in phases:
        rec.phase = f"skew_{name}:deploy"
        waited = deploy(split_app(base, **extra, options=scaling), {"Retriever": 1, "Scorer": 1})
        rec.phase = f"skew_{name}"
        start = len(rec.samples)
        until = functools.partial(scaled_and_held, rec, start, heavy, 3, 3.0)
        run = asyncio.run(closed_loop_until(urls, reqs, SKEW_CONCURRENCY, max_s, until))
        samples, pair = rec.since(start), ("Retriever", "Scorer")
        max_running = {d: max((s.get(d, 0) for s in samples), default=0) for d in pair}
        max_target = {d: max((s.get(d, 0) + s.get(f"{d}_starting", 0) for s in samples), default=0) for d in pair}
        t0 = samples[0]["t_s"] if samples else 0.0
        first = {
            d: next((s["t_s"] - t0 for s in samples if s.get(d, 0) + s.get(f"{d}_starting", 0) > 1), None) for d in pair
        }
        mean = {
            d: float(np.mean([s.get(d, 0) + s.get(f"{d}_starting", 0) for s in samples])) if samples else 0.0
            for d in pair
        }
        out[name] = {
            **run,
            "extra": extra,
            "deploy_wait_s": waited,
            "max_running": max_running,
            "max_running_plus_starting": max_target,
            "mean_running_plus_starting": mean,
            "s_to_first_upscale": first,
            "scaled": [d for d, n in max_target.items() if n > 1],
            "first_to_scale": min(
                (d for d in pair if first[d] is not None), key=lambda d: first[d] or 0.0, default=None
            ),
        }
    return out


def scaled_and_held(rec: ReplicaRecorder, start: int, deployment: str, n: int, hold_s: float) -> bool:
    samples = rec.since(start)
    reached = [s["t_s"] for s in samples if s.get(deployment, 0) >= n]
    return bool(reached) and samples[-1]["t_s"] - reached[0] >= hold_s


async def closed_loop_until(urls: list[str], reqs: Requests, concurrency: int, max_s: float, done) -> dict:
    """Closed loop that stops when done() is true (checked every 0.5 s) or after max_s."""

    async def watch():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < max_s and not done():
            await asyncio.sleep(0.5)
        stop.set()

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch())
    result = await closed_loop(urls, reqs, concurrency, 10**9, max_s, stop)
    await watcher
    return result


if __name__ == "__main__":
    sys.exit(main())
