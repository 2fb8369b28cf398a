"""Autoscaling on cluster.yaml's node types (Ray's fake_multinode provider: real autoscaler, real raylets on this
machine).

    python -m bench.autoscale --quick            # -> bench/out/autoscale.json

Measures, starting each time from a head with no worker:
  scale_up_s    from a demand (a task that asks for gpu_trainer) to that task running on the new node: the node's
                resources schedulable;
  scale_down_s  from the node going idle (the task done) to the autoscaler terminating it, with a short idle timeout;
                `overhead_s` = scale_down_s - idle timeout is what the autoscaler adds, and `projected` puts it beside
                cluster.yaml's idle_timeout_minutes and Ray's default;
  job_s         jobs/pretrain.py with --worker-resources '{"gpu_trainer": 0.01}': scale from zero, run, finish;
  nodes_launched by type during the job, and the load average (os.getloadavg()) at the start and the end.
Re-runs itself inside a private network namespace (as scripts/test.sh does) where the kernel allows one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seminar_ray.testing.fake_cluster import LocalAutoscalingCluster, NodeWatcher, local_node_types

ROOT = Path(__file__).resolve().parents[1]

RAY_DEFAULTS = {"idle_timeout_minutes": 5.0, "upscaling_speed": 1.0}  # ray/autoscaler/aws/defaults.yaml (2.60)
IDLE_MINUTES = 0.1
HEAD = {"CPU": 8, "object_store_memory": 200 * 1024**2}  # room for the job's Ray Data tasks (docs/scaling.md)


def _in_netns() -> None:
    if os.environ.get("SEMINAR_NETNS") or shutil.which("unshare") is None:
        return
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        print("note: no private network namespace here; running on the host network", file=sys.stderr)
        return
    env = {**os.environ, "SEMINAR_NETNS": "1"}
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
    sys.exit(subprocess.run(cmd, env=env).returncode)


def scale_cycle(watch: NodeWatcher, timeout_s: float = 300) -> dict:
    """One demand for a gpu_trainer node, from zero: up (demand -> task running there), down (idle -> terminated)."""
    import ray

    @ray.remote(num_cpus=0.5, resources={"gpu_trainer": 0.01})
    def probe() -> tuple[float, str]:
        return time.time(), ray.get_runtime_context().get_node_id()

    watch.wait_for(lambda w: w.alive() == 0, timeout_s, "no worker node before the cycle")
    t_demand = time.time()
    started, node = ray.get(probe.remote(), timeout=timeout_s)
    t_idle = time.time()
    t_down = watch.wait_for(
        lambda w: any(e.node_id == node and e.down_s is not None for e in w.launched()),
        timeout_s,
        "the gpu_trainer node terminated",
    )
    return {"scale_up_s": round(started - t_demand, 2), "scale_down_s": round(watch.t0 + t_down - t_idle, 2)}


def pretrain_job(cluster: LocalAutoscalingCluster, watch: NodeWatcher, data: Path, out: Path) -> dict:
    watch.wait_for(lambda w: w.alive() == 0, 300, "no worker node before the job")
    t_start = watch.now()
    cmd = [
        sys.executable,
        "-m",
        "jobs.pretrain",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--num-workers",
        "1",
        "--cpus-per-worker",
        "0.5",
        "--samples-per-user",
        "1",
        "--eval-users",
        "32",
        "--set",
        "max_len=32",
        "--worker-resources",
        '{"gpu_trainer": 0.01}',
    ]
    t0 = time.time()
    proc = subprocess.run(
        cmd, env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=900, cwd=ROOT
    )  # -m: jobs is a package
    job_s = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return {"job_s": round(job_s, 1), "nodes_launched": watch.counts(after_s=t_start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "autoscale.json")
    p.add_argument("--quick", action="store_true", help="one scale cycle and one job (else 3 cycles)")
    args = p.parse_args(argv)
    _in_netns()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    import yaml

    from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir

    load_start = os.getloadavg()
    t_bench = time.time()
    types = local_node_types(ROOT / "cluster.yaml")
    work = Path(tempfile.mkdtemp(prefix="bench_autoscale_"))
    try:
        generate_to_dir(SyntheticConfig.preset("tiny"), work / "data")
        with LocalAutoscalingCluster(types, head_resources=dict(HEAD), idle_timeout_minutes=IDLE_MINUTES) as cluster:
            cluster.connect(log_to_driver=False, configure_logging=False)
            try:
                with NodeWatcher(types) as watch:
                    cycles = [scale_cycle(watch) for _ in range(1 if args.quick else 3)]
                    job = pretrain_job(cluster, watch, work / "data", work / "runs")
                    watch.wait_for(lambda w: w.alive() == 0, 300, "every worker node terminated after the job")
                    timeline = watch.summary()
            except BaseException:
                # the head's own log says why when it is the head that went (it exits under heavy load)
                print(f"bench failed; the head's log ends:\n{cluster.log_tail()}", file=sys.stderr)
                raise
            finally:
                ray.shutdown()  # before the cluster goes: a driver left connected to a dead GCS aborts after 60 s
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()

    idle_s = IDLE_MINUTES * 60
    down = statistics.median(c["scale_down_s"] for c in cycles)
    overhead = round(down - idle_s, 2)
    ours = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    result = {
        "what": "cluster.yaml node types on Ray's fake_multinode autoscaler (v1), 2-core machine shared with others",
        "quick": args.quick,
        "scale_up_s": statistics.median(c["scale_up_s"] for c in cycles),
        "scale_down_s": down,
        "cycles": cycles,
        **job,
        "idle_timeout_s": idle_s,
        "scale_down_overhead_s": overhead,
        "projected_scale_down_s": {
            "cluster_yaml": {
                "idle_timeout_minutes": ours["idle_timeout_minutes"],
                "scale_down_s": round(ours["idle_timeout_minutes"] * 60 + overhead, 1),
            },
            "ray_default": {
                "idle_timeout_minutes": RAY_DEFAULTS["idle_timeout_minutes"],
                "scale_down_s": round(RAY_DEFAULTS["idle_timeout_minutes"] * 60 + overhead, 1),
            },
        },
        "upscaling_speed": {
            "cluster_yaml": ours["upscaling_speed"],
            "ray_default": RAY_DEFAULTS["upscaling_speed"],
            "bench": 1.0,
        },
        "node_types": {k: v["resources"] for k, v in types.items()},
        "timeline": timeline,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "bench_s": round(time.time() - t_bench, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("scale_up_s", "scale_down_s", "job_s", "nodes_launched", "loadavg_start", "loadavg_end")
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
