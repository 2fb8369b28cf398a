"""Where the app's time goes at concurrency 1: py-spy on the replicas of the app and of its zero-work floor.

    python -m bench.serve_profile --out bench/out/serve_profile.json [--ingress direct] [--seconds 20]

Same artefacts and requests as bench/serve_load.py (L = 2,000, 100 candidates), 1 Retriever + 1 Scorer each, on a
local Ray on 127.0.0.1. For each side (floor, then app), a closed loop at c = 1 runs for --seconds while py-spy
samples both replica processes (non-blocking; stacks waiting in C dropped). Per process and side it reports the CPU
milliseconds per request from /proc, less its idle background (immune to the machine's load, which inflates
sampled wall time) and the
heaviest frames (self and inclusive sampled time per request), so the app's extra time over the floor can be read
off by process and by frame. The in-process stage times of the same requests are measured too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.serve_load import APP, FLOOR_APP, L, Requests, build_default_artefacts, closed_loop, deploy, in_process, warm
from bench.serve_variants import floor_app
from serve_app.app import compose
from serve_app.deploy import direct_urls, set_ingress_env

RATE_HZ = 250
IDLE_S = 5.0
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, user + system, all threads; minor page faults) of a process: /proc/PID/stat fields 14 + 15, 10."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S, int(fields[7])


def cpu_s(pid: int) -> float:
    return proc_stat(pid)[0]


def replica_pids(app: str) -> dict[str, int]:
    """Deployment name → pid of the app's (single) live replica of it, from the GCS actor table."""
    from ray._private.state import actors

    out = {}
    for info in actors().values():
        name = info.get("Name") or ""
        if info["State"] == "ALIVE" and name.startswith(f"SERVE_REPLICA::{app}#"):
            out[name.split("#")[1]] = int(info["Pid"])
    return out


def parse_raw(text: str) -> Counter:
    """py-spy --format raw: one collapsed stack per line, `frame;frame;... count`."""
    stacks: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            stacks[stack] += int(n)
    return stacks


def frame_name(frame: str) -> str:
    """`function (path/to/file.py:123)` → `function (file.py)`: lines merged."""
    fn, _, where = frame.partition(" (")
    return f"{fn} ({Path(where.split(':')[0]).name})" if where else fn


# Leaf frames of a thread waiting in C (py-spy's idle detection does not see these blocking calls as idle).
WAITING = {"Worker.main_loop (worker.py)", "Thread.run (threading.py)", "_worker (thread.py)"}


def summarise(stacks: Counter, requests: int, top: int = 25) -> dict:
    ms = 1000.0 / RATE_HZ / max(requests, 1)  # one sample, in milliseconds per request
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for stack, n in stacks.items():
        frames = [frame_name(f) for f in stack.split(";")]
        if frames[-1] in WAITING:
            continue
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    total = sum(self_t.values())
    return {
        "busy_ms_per_request": total * ms,
        "samples": total,
        "self_ms_per_request": {f: round(n * ms, 4) for f, n in self_t.most_common(top)},
        "inclusive_ms_per_request": {f: round(n * ms, 4) for f, n in incl.most_common(top)},
    }


def profile_side(label: str, app: str, urls: list[str], reqs: Requests, seconds: float, out_dir: Path) -> dict:
    pids = replica_pids(app)
    procs = {}
    for deployment, pid in pids.items():  # py-spy runs through the idle window and the loop
        path = out_dir / f"{label}_{deployment}.txt"
        procs[deployment] = (
            subprocess.Popen(
                [
                    shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(RATE_HZ),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--duration",
                    str(int(seconds + IDLE_S) + 2),
                    "--output",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
            path,
        )
    # the replicas' background CPU (metrics, health checks) while idle, subtracted below: spread over requests it
    # would weigh more on the side that served fewer of them
    idle_start, t_idle = {d: cpu_s(pid) for d, pid in pids.items()}, time.perf_counter()
    time.sleep(IDLE_S)
    idle_rate = {d: (cpu_s(pid) - idle_start[d]) / (time.perf_counter() - t_idle) for d, pid in pids.items()}
    load_start = os.getloadavg()
    start, t0 = {d: proc_stat(pid) for d, pid in pids.items()}, time.perf_counter()
    run = asyncio.run(closed_loop(urls, reqs, 1, 10**9, seconds))
    busy_s = time.perf_counter() - t0
    end = {d: proc_stat(pid) for d, pid in pids.items()}
    cpu_used = {d: end[d][0] - start[d][0] - idle_rate[d] * busy_s for d in pids}
    faults = {d: end[d][1] - start[d][1] for d in pids}
    run.pop("_lat")
    result: dict[str, Any] = {
        "closed_c1": run,
        "processes": {},
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }
    for deployment, (proc, path) in procs.items():
        _, err = proc.communicate(timeout=seconds + 30)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"py-spy on {deployment} (pid {pids[deployment]}) failed: {err.decode()[-500:]}")
        result["processes"][deployment] = {
            # CPU time from the kernel: unlike sampled wall time, a loaded machine does not inflate it
            "cpu_ms_per_request": 1e3 * cpu_used[deployment] / max(run["requests"], 1),
            "idle_cpu_ms_per_s": 1e3 * idle_rate[deployment],
            "minor_faults_per_request": faults[deployment] / max(run["requests"], 1),
            **summarise(parse_raw(path.read_text()), run["requests"]),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/serve_profile.json"))
    ap.add_argument("--ingress", default="direct", choices=("proxy", "direct"))
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--port", type=int, default=18341)
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    from seminar_ray.data.schema import DatasetMeta, read_table

    t0 = time.time()
    root = Path(tempfile.mkdtemp(prefix="serve_profile_"))
    art = build_default_artefacts(root, users=24)
    meta = DatasetMeta.load(art["data"])
    seqs = read_table(art["data"], "sequences", ["user_id", "item_ids"]).to_pydict()
    reqs = Requests(
        [u for u, i in zip(seqs["user_id"], seqs["item_ids"]) if len(i) >= L], meta.num_queries, meta.num_items
    )
    base = {**art, "limits": {"max_candidates": 200}}
    set_ingress_env(args.ingress)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"enable_access_log": False})
    expect = {"Retriever": 1, "Scorer": 1}
    fixed = {d: {"num_replicas": 1, "autoscaling_config": None} for d in expect}
    try:
        deploy(floor_app(fixed), expect, name=FLOOR_APP, route_prefix="/floor")
        deploy(compose(base, fixed), expect)

        def urls(app: str, prefix: str) -> list[str]:
            found = direct_urls(app) if args.ingress == "direct" else [f"http://127.0.0.1:{args.port}"]
            return [u + prefix for u in found]

        sides = {"floor": (FLOOR_APP, urls(FLOOR_APP, "/floor")), "app": (APP, urls(APP, ""))}
        for _, u in sides.values():
            warm(u, reqs, 60)
        out_dir = root / "pyspy"
        out_dir.mkdir()
        result = {
            "ingress": args.ingress,
            "rate_hz": RATE_HZ,
            "seconds": args.seconds,
            "load_avg_before": os.getloadavg(),
            "sides": {},
        }
        for label, (app, u) in sides.items():
            result["sides"][label] = profile_side(label, app, u, reqs, args.seconds, out_dir)
        result["inprocess"] = in_process(base | {"retrieval": "exact"}, reqs, 200, "exact")
    finally:
        serve.shutdown()
        ray.shutdown()
    f, a = result["sides"]["floor"], result["sides"]["app"]
    result["c1_p50_ms"] = {"floor": f["closed_c1"]["p50_ms"], "app": a["closed_c1"]["p50_ms"]}
    result["cpu_ms_per_request"] = {
        side: {d: p["cpu_ms_per_request"] for d, p in r["processes"].items()} for side, r in result["sides"].items()
    }
    result["minor_faults_per_request"] = {
        side: {d: p["minor_faults_per_request"] for d, p in r["processes"].items()}
        for side, r in result["sides"].items()
    }
    result["load_avg_after"] = os.getloadavg()
    result["wall_s"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "c1_p50_ms",
                    "cpu_ms_per_request",
                    "minor_faults_per_request",
                    "load_avg_before",
                    "load_avg_after",
                )
            }
            | {"inprocess_p50_ms": result["inprocess"]["p50_ms"]},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
