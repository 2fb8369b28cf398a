"""The app's per-request work in one process, hot and with another process taking its core between stages: how much
dearer the same work gets on a shared core (serve_app/README.md, "Where the time goes at c = 1").

    python -m bench.serve_cold_work --out bench/out/serve_cold_work.json [--quick]

Same artefacts and requests as bench/serve_load.py (L = 2,000, 100 candidates, exact retrieval), the stages called
as serve_app/app.py calls them. The process is pinned to one core. Before the retrieval and before the scoring of
each request it hands the core to a forked partner process, pinned to the same core, for --gap-ms and waits for it
to answer (at c = 1 a replica waits in the same way while the proxy, the other replica and the client run). Partners:
  - hot:        no hand-off (what `inprocess_p50_ms` of bench/serve_load.py measures: requests back to back);
  - idle:       the partner sleeps, so the core idles;
  - switch:     the partner busy-waits (a process switch with almost no memory footprint);
  - serve_like: the partner runs Python over a few MB (dicts, JSON, a numpy sweep), like a Serve process.
The modes alternate in rounds, so a drift in this shared machine's speed hits all alike; the figures are each stage's
median thread CPU and its ratio to hot. The load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads OpenBLAS: one BLAS thread, as in the replicas

import numpy as np

from bench.serve_load import InProcessWork, Requests, build_default_artefacts
from seminar_ray.serving import ScoreJob

MODES = ("hot", "idle", "switch", "serve_like")


def partner(mode: str, gap_s: float, go: int, done: int) -> None:
    """The other process on the core: on each byte from `go`, occupy the core (or not) for gap_s, then answer."""
    sweep = np.zeros(8 << 20, np.uint8)
    objs: list[dict[str, Any]] = [{"id": i, "name": str(i), "tags": [i, i + 1]} for i in range(50_000)]
    while os.read(go, 1) == b"g":
        end = time.perf_counter() + gap_s
        if mode == "idle":
            time.sleep(gap_s)
        while time.perf_counter() < end:
            if mode == "serve_like":
                sweep[::64] += 1
                json.dumps(objs[:2000])
                sum(len(o["tags"]) for o in objs[::7])
        os.write(done, b"k")


def measure(work: InProcessWork, reqs: Requests, mode: str, n: int, gap_s: float) -> dict[str, list[float]]:
    """Thread CPU seconds of each stage of n requests, with `mode`'s partner taking the core before each stage."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork() if mode != "hot" else 0
    if mode != "hot" and pid == 0:
        partner(mode, gap_s, go_r, done_w)
        os._exit(0)

    def hand_off() -> None:
        if pid:
            os.write(go_w, b"g")
            os.read(done_r, 1)

    cpu: dict[str, list[float]] = {"retrieve": [], "score": []}
    for i in range(n):
        hand_off()
        c0 = time.thread_time()
        wire = work.retrieve(reqs[i]).to_wire()  # the job crosses replicas as this
        c1 = time.thread_time()
        hand_off()
        c2 = time.thread_time()
        work.score(ScoreJob.from_wire(wire))
        cpu["retrieve"].append(c1 - c0)
        cpu["score"].append(time.thread_time() - c2)
    if pid:
        os.write(go_w, b"q")
        os.waitpid(pid, 0)
    for fd in (go_r, go_w, done_r, done_w):
        os.close(fd)
    return cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/serve_cold_work.json"))
    ap.add_argument("--quick", action="store_true", help="3 rounds of 150 requests per mode (about 2 minutes)")
    ap.add_argument("--gap-ms", type=float, default=3.0, help="how long the partner holds the core each time")
    args = ap.parse_args(argv)
    rounds, n = (3, 150) if args.quick else (6, 300)
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    t0, load_start = time.time(), os.getloadavg()
    from seminar_ray.data.schema import DatasetMeta, read_table

    art = build_default_artefacts(Path(tempfile.mkdtemp(prefix="cold_work_")), users=24)
    meta = DatasetMeta.load(art["data"])
    users = read_table(art["data"], "sequences", ["user_id"]).column("user_id").to_pylist()
    work = InProcessWork(art, "exact")
    reqs = Requests(users, meta.num_queries, meta.num_items)
    measure(work, reqs, "hot", 30, 0.0)  # warm-up
    cpu: dict[str, dict[str, list[float]]] = {m: {"retrieve": [], "score": []} for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            for stage, values in measure(work, reqs, mode, n, args.gap_ms / 1e3).items():
                cpu[mode][stage] += values[5:]  # the first few after a partner starts are its own warm-up
        print(f"round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    p50 = {m: {s: float(np.median(v)) * 1e3 for s, v in st.items()} for m, st in cpu.items()}
    for m in p50:
        p50[m]["total"] = float(np.median(np.add(cpu[m]["retrieve"], cpu[m]["score"]))) * 1e3
    result = {
        "L": 2000,
        "candidates": 100,
        "retrieval": "exact",
        "gap_ms": args.gap_ms,
        "rounds": rounds,
        "requests_per_round": n,
        "core": core,
        "cpu_p50_ms": p50,
        "ratio_to_hot": {m: {s: v / p50["hot"][s] for s, v in st.items()} for m, st in p50.items()},
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "wall_s": time.time() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for m, st in p50.items():
        print(f"{m:>10}: " + "  ".join(f"{s} {v:.3f} ms ({result['ratio_to_hot'][m][s]:.2f}x)" for s, v in st.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
