"""HTTP load test of the Ray Serve scoring app against its zero-work floor, measured in the same run (DESIGN §6).

    python bench/serve_load.py --out bench/out/serve.json [--quick] [--checkpoint C --index I --data D]

Self-contained: without --checkpoint/--index/--data it builds synthetic data with L = 2,000 histories, an untrained
small SEMINAR and its folded PQ index. Every request: a user with a 2,000-long history, 100 candidates.
Phases, one Ray Serve instance on 127.0.0.1 only, bounded request counts and wall time:
  1. zero-work floor (same graph, work removed) and the real app, topology "merged": closed loop at several
     concurrencies and a fixed-rate open loop;
  2. the same scoring called in-process (RetrievalStage + ScoringStage in this process);
  3. topology "split" (separate Ingress) floor and real at the headline concurrency, for the topology choice;
  4. skewed loads on "split" (retriever-heavy, scorer-heavy: extra CPU in one stage) with replica counts over time.
The machine is shared and noisy: the ratios against the floor of the same run are the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

APP = "bench"
L, CANDIDATES = 2000, 100


def percentiles(lat_s: list[float]) -> dict:
    if not lat_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ms = np.asarray(lat_s) * 1e3
    return {f"p{p}_ms": float(np.percentile(ms, p)) for p in (50, 95, 99)}


class Requests:
    """Deterministic request bodies: users with full histories, 100 random candidates, a query id or none."""

    def __init__(self, users: list[int], num_items: int, num_queries: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.bodies = [{"user_id": int(rng.choice(users)),
                        "candidates": (rng.choice(num_items, CANDIDATES, replace=False) + 1).tolist(),
                        "query": int(rng.integers(0, num_queries + 1)) if rng.random() < 0.3 else None}
                       for _ in range(256)]

    def __getitem__(self, n: int) -> dict:
        return self.bodies[n % len(self.bodies)]


async def closed_loop(url: str, reqs: Requests, concurrency: int, max_requests: int, max_s: float) -> dict:
    import httpx

    lat, errors, sent = [], 0, 0
    deadline = time.perf_counter() + max_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            nonlocal errors, sent
            while sent < max_requests and time.perf_counter() < deadline:
                body = reqs[sent]
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/score", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                lat.append(time.perf_counter() - t0) if ok else None
                errors += 0 if ok else 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": sent, "errors": errors, "wall_s": wall,
            "rps": len(lat) / wall, **percentiles(lat)}


async def open_loop(url: str, reqs: Requests, rate: float, duration_s: float) -> dict:
    """Fixed arrival rate; latency counted from each request's scheduled time (queueing included)."""
    import httpx

    lat, errors = [], 0
    n = int(rate * duration_s)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()

        async def one(i: int):
            nonlocal errors
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                r = await client.post("/v1/score", json=reqs[i])
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            lat.append(time.perf_counter() - due) if ok else None
            errors += 0 if ok else 1
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
    return {"rate": rate, "requests": n, "errors": errors, "wall_s": wall, "rps": len(lat) / wall,
            **percentiles(lat)}


class ReplicaRecorder:
    """Polls serve.status() and records RUNNING replicas per deployment with a phase label."""

    def __init__(self, period_s: float = 1.0):
        self.samples, self.phase, self.period = [], "start", period_s
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from ray import serve

        while not self._stop.is_set():
            try:
                app = serve.status().applications.get(APP)
                if app is not None:
                    counts = {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}
                    self.samples.append({"t_s": round(time.time() - self.t0, 2), "phase": self.phase, **counts})
            except Exception as e:  # a status poll racing a redeploy: record it, keep polling
                self.samples.append({"t_s": round(time.time() - self.t0, 2), "phase": self.phase, "error": repr(e)})
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def deploy(args: dict) -> None:
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(args), name=APP, route_prefix="/")


def warm(url: str, reqs: Requests, n: int) -> None:
    asyncio.run(closed_loop(url, reqs, 2, n, 60))


def in_process(art, reqs: Requests, n: int) -> dict:
    """The same retrieval + scoring called directly in this process (no HTTP, no Serve)."""
    import torch

    from seminar_ray.data.entities import EntityTables
    from seminar_ray.retrieval.index import PQIndex
    from seminar_ray.serving import Catalog, LogHistoryStore, RetrievalStage, ScoringStage, load_serving_model

    torch.set_num_threads(1)
    model, _ = load_serving_model(art["checkpoint"], EntityTables.load(art["data"]))
    retrieval, scoring = RetrievalStage(model, PQIndex.load(art["index"])), ScoringStage(model)
    store, catalog = LogHistoryStore(art["store"], art["data"]), Catalog.load(art["data"])
    lat = []
    for i in range(n + 5):
        body = reqs[i]
        t0 = time.perf_counter()
        qid, _ = catalog.resolve_query(body["query"])
        store.refresh()
        job = retrieval.prepare(store.history(body["user_id"], model.cfg.max_len), qid,
                                catalog.validate_candidates(body["candidates"]))
        scoring.score_batch([job])
        if i >= 5:
            lat.append(time.perf_counter() - t0)
    return {"requests": n, **percentiles(lat)}


def build_default_artefacts(root: Path, users: int) -> dict:
    from seminar_ray.serving.artefacts import build_artefacts

    a = build_artefacts(root, num_users=users, min_len=L, max_len=L + 1, model_max_len=L)
    return {"checkpoint": str(a.checkpoint), "index": str(a.index), "data": str(a.data), "store": str(a.store)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/serve.json"))
    ap.add_argument("--quick", action="store_true", help="short runs (< 5 minutes in all)")
    ap.add_argument("--checkpoint")
    ap.add_argument("--index")
    ap.add_argument("--data")
    ap.add_argument("--port", type=int, default=18321)
    args = ap.parse_args(argv)
    t_start = time.time()
    quick = args.quick
    conc = [1, 4, 8] if quick else [1, 2, 4, 8, 16]
    headline = 8
    per_level = dict(max_requests=120 if quick else 600, max_s=6 if quick else 25)
    skew_s = 15 if quick else 40

    import ray
    from ray import serve

    from seminar_ray.data.schema import DatasetMeta, read_table

    root = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    if args.checkpoint:
        art = {"checkpoint": args.checkpoint, "index": args.index, "data": args.data, "store": str(root / "history")}
    else:
        art = build_default_artefacts(root, users=24 if quick else 64)
    meta = DatasetMeta.load(art["data"])
    seqs = read_table(art["data"], "sequences", ["user_id", "item_ids"]).to_pydict()
    users = [u for u, items in zip(seqs["user_id"], seqs["item_ids"]) if len(items) >= L]
    if not users:
        raise SystemExit(f"{art['data']}: no user has a history of {L}; pass data with long histories or none")
    reqs = Requests(users, meta.num_items, meta.num_queries)

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    result: dict = {"candidates": CANDIDATES, "L": L, "quick": quick, "headline_concurrency": headline,
                    "loadavg_start": os.getloadavg()}

    def loops(label: str, cfg: dict, rec: ReplicaRecorder, levels: list[int], open_rate: float | None) -> dict:
        rec.phase = f"{label}:deploy"
        deploy(cfg)
        rec.phase = f"{label}:warmup"
        warm(url, reqs, 20)
        out = {"closed": []}
        for c in levels:
            rec.phase = f"{label}:closed_c{c}"
            out["closed"].append(asyncio.run(closed_loop(url, reqs, c, **per_level)))
        if open_rate:
            rec.phase = f"{label}:open"
            out["open"] = asyncio.run(open_loop(url, reqs, open_rate, 6 if quick else 20))
        return out

    base = {**art, "topology": "merged", "limits": {"max_candidates": 200}}
    with ReplicaRecorder() as rec:
        floor = loops("floor_merged", {**base, "work": False}, rec, conc, None)
        floor_head = next(r for r in floor["closed"] if r["concurrency"] == headline)
        rate = round(0.5 * floor_head["rps"], 1)
        floor["open"] = asyncio.run(open_loop(url, reqs, rate, 6 if quick else 20))
        real = loops("real_merged", base, rec, conc, rate)
        rec.phase = "inprocess"
        inproc = in_process(art, reqs, 40 if quick else 200)
        split_floor = loops("floor_split", {**base, "topology": "split", "work": False}, rec, [headline], None)
        split_real = loops("real_split", {**base, "topology": "split"}, rec, [headline], None)
        skew = {}
        for name, extra in (("retriever_heavy", {"retriever_extra_cpu_ms": 25}),
                            ("scorer_heavy", {"scorer_extra_cpu_ms": 25})):
            rec.phase = f"skew_{name}:deploy"
            deploy({**base, "topology": "split", **extra})
            rec.phase = f"skew_{name}"
            start = len(rec.samples)
            run = asyncio.run(closed_loop(url, reqs, 8, 10_000, skew_s))
            phase = [s for s in rec.samples[start:] if "error" not in s]
            skew[name] = {**run, "extra": extra,
                          "max_replicas": {d: max((s.get(d, 0) for s in phase), default=0)
                                           for d in ("PQRetriever", "ESUScorer")}}
    serve.shutdown()
    ray.shutdown()

    real_head = next(r for r in real["closed"] if r["concurrency"] == headline)
    c1 = next(r for r in real["closed"] if r["concurrency"] == 1)
    result.update({
        "rps": real_head["rps"], "p50_ms": real_head["p50_ms"], "p95_ms": real_head["p95_ms"],
        "p99_ms": real_head["p99_ms"], "errors": sum(r["errors"] for r in real["closed"]) + real["open"]["errors"],
        "requests": sum(r["requests"] for r in real["closed"]) + real["open"]["requests"],
        "floor_rps": floor_head["rps"], "floor_p99_ms": floor_head["p99_ms"],
        "inprocess_p50_ms": inproc["p50_ms"], "c1_p50_ms": c1["p50_ms"],
        "floor_c1_p50_ms": next(r for r in floor["closed"] if r["concurrency"] == 1)["p50_ms"],
        "replicas_over_time": rec.samples,
        "floor": floor, "real": real, "inprocess": inproc,
        "topology": {"merged": {"floor": floor_head, "real": real_head},
                     "split": {"floor": split_floor["closed"][0], "real": split_real["closed"][0]}},
        "skew": skew,
    })
    result["targets"] = {
        "rps_ratio_vs_floor": result["rps"] / result["floor_rps"],
        "rps_ge_0.8_floor": result["rps"] >= 0.8 * result["floor_rps"],
        "p99_le_floor_p99_plus_20ms": result["p99_ms"] <= result["floor_p99_ms"] + 20,
        "zero_errors": result["errors"] == 0,
        "c1_p50_minus_inprocess_ms": result["c1_p50_ms"] - result["inprocess_p50_ms"],
        "c1_within_5ms_of_inprocess": result["c1_p50_ms"] - result["inprocess_p50_ms"] <= 5,
        "stretch_100_rps": result["rps"] >= 100,
    }
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.time() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    summary = {k: result[k] for k in ("rps", "p50_ms", "p99_ms", "errors", "floor_rps", "floor_p99_ms",
                                      "inprocess_p50_ms", "c1_p50_ms", "wall_s")}
    print(json.dumps({**summary, "targets": result["targets"],
                      "skew": {k: v["max_replicas"] for k, v in skew.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
