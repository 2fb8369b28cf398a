"""Scale of the data path (issue 23, item 6): prepare the `large` synthetic preset, then one pass of the Ray Data
user-level training collate over every user with 2 workers and no model.

1. `jobs.prepare_data --source synthetic --scale large` in a subprocess under /usr/bin/time -v: wall time and the
   peak RSS of the job's process (the Ray workers of its closing summary are not counted).
2. `read_sequences` → `streaming_split(2, equal=True)` → two Ray tasks (0.5 CPU each) that each iterate
   `train_batches(shard, SampleConfig(max_len=2000, samples_per_user=0, num_neg=4), epoch=0, targets_per_row=256)`:
   every training position of every user. Behaviours/s counts each user's whole sequence (targets + 3: the test,
   validation and first behaviour are not targets). Peak RSS (VmHWM) of the driver, the two consumers and every
   other process of this Ray node; object-store spilling from Ray's memory summary.
3. Baseline in the same run: the per-target collate (`targets_per_row=0`, each target its own [L] copy of history)
   against the user-level one over the same first `--baseline-users` users (40), in this process, no Ray, batches of
   2 users: at L = 2,000 the per-target form copies up to 2 × 2,000 ids per target (16 user-batches of it held 4 GB),
   so only a subset is run.

    python -m bench.data_scale --quick      # the large preset's shape with 5,000 users (≤ 10 min on 2 cores)
    python -m bench.data_scale              # all 100,000 users (~150 M behaviours)
    python -m bench.data_scale --data /work/data/large --skip-prepare   # collate pass over a prepared directory

Every figure has `os.getloadavg()` beside it: this machine is shared, so a figure means little without its load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from seminar_ray.data.pipeline import TrainCollate, read_sequences, sample_config, train_batches
from seminar_ray.data.schema import DatasetMeta, table_path
from seminar_ray.testing.local_ray import OBJECT_STORE_BYTES, init_local_ray

log = logging.getLogger("bench.data_scale")
CONSUMER_CPUS = 0.5
L = 2000
TARGETS_PER_ROW = 256


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def prepare(out: Path, users: int | None) -> dict:
    """Run prepare_data --scale large under /usr/bin/time -v: wall seconds and the job process's peak RSS."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "jobs.prepare_data", "--source", "synthetic"]
    cmd += ["--scale", "large", "--out", str(out)] + (["--users", str(users)] if users else [])
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"prepare_data failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {
        "users": DatasetMeta.load(out).num_users,
        "behaviours": DatasetMeta.load(out).num_behaviours,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
        "loadavg_before": before,
        "loadavg_after": load(),
    }


def timed_log(path: Path, data: Path) -> dict:
    """The prepare figures of an earlier `/usr/bin/time -v python -m jobs.prepare_data ...` run, from its stderr."""
    text = path.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise ValueError(f"{path}: no /usr/bin/time -v figures in it")
    parts = [float(x) for x in wall.group(1).split(":")]
    return {
        "users": DatasetMeta.load(data).num_users,
        "behaviours": DatasetMeta.load(data).num_behaviours,
        "seconds": round(sum(x * 60**i for i, x in enumerate(reversed(parts))), 1),
        "peak_rss_mb": round(int(rss.group(1)) / 1024, 1),
        "from": str(path),
        "exit_status": status[1] if (status := re.search(r"Exit status: (\d+)", text)) else None,
    }


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident set (VmHWM) of a process, in MiB; 0 when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return round(int(m.group(1)) / 1024, 1) if m else 0.0


def _descendants(root: int) -> dict[int, str]:
    """pid → name of every live process below `root` (from /proc/*/stat)."""
    parent: dict[int, int] = {}
    names: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        parent[int(d.name)], names[int(d.name)] = int(rest[1]), name
    found, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parent.items():
            if pp == p and c not in found:
                found[c] = names[c]
                frontier.append(c)
    return found


def node_processes_hwm(root: int, seen: dict[int, tuple[str, float]]) -> None:
    """Update `seen` (pid → (name, peak MiB)) with every process of this Ray node; VmHWM only grows."""
    for pid, name in _descendants(root).items():
        hwm = vm_hwm_mb(pid)
        if hwm > seen.get(pid, ("", 0.0))[1]:
            seen[pid] = (name, hwm)


def consume(shard, cfg, users_per_batch: int) -> dict:
    """One epoch of user-level batches from a streaming_split shard: users, rows, targets; this process's peak RSS."""
    t0 = time.perf_counter()
    users, rows, targets, ids = 0, 0, 0, 0
    first = None
    for batch in train_batches(shard, cfg, epoch=0, users_per_batch=users_per_batch, targets_per_row=TARGETS_PER_ROW):
        valid = batch["target_valid"]
        users += int(batch["user_id"].unique().numel())
        rows += int(valid.shape[0])
        targets += int(valid.sum())
        ids += int(batch["seq_items"].numel() + batch["target_items"].numel())
        if first is None:
            first = time.perf_counter() - t0
    return {
        "users": users,
        "rows": rows,
        "targets": targets,
        "ids_per_target": round(ids / max(targets, 1), 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "first_batch_s": round(first or 0.0, 2),
        "pid": os.getpid(),
        "peak_rss_mb": vm_hwm_mb(),
    }


def spilled(summary: str) -> dict:
    """Spilling and restoring as Ray's memory summary states them (MiB and objects; 0 when it says nothing)."""
    out: dict = {}
    for kind in ("Spilled", "Restored"):
        m = re.search(rf"{kind} (\d+) MiB, (\d+) objects", summary)
        out[f"{kind.lower()}_mib"], out[f"{kind.lower()}_objects"] = (int(m[1]), int(m[2])) if m else (0, 0)
    return out


def start_ray(attempts: int = 4) -> None:
    """The tests' local Ray node (seminar_ray.testing.local_ray). Ray gives its raylet 30 s to register (hard-coded
    in Ray 2.60); on a shared machine at a load of ~60 under nice 19 that fails, so start again a few times before
    giving up."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            init_local_ray()
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            log.warning("Ray node start timed out (attempt %d/%d, load %s); starting again", attempt, attempts, load())
            ray.shutdown()
            time.sleep(10)


def collate_pass(data: Path, users_per_batch: int) -> dict:
    """The 2-worker Ray Data pass over every user: rates, peak RSS per process, spilling."""
    import ray
    from ray._private import internal_api

    cfg = sample_config(data, max_len=L, samples_per_user=0, num_neg=4)
    start_ray()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        node = ray._private.worker._global_node
        assert node is not None, "ray.init() started no node"
        raylet = node.all_processes["raylet"][0].process.pid
        task = ray.remote(num_cpus=CONSUMER_CPUS)(consume)
        seen: dict[int, tuple[str, float]] = {}
        before = load()
        t0 = time.perf_counter()
        shards = read_sequences(data).streaming_split(2, equal=True)
        pending = [task.remote(s, cfg, users_per_batch) for s in shards]
        while True:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=5.0)
            node_processes_hwm(raylet, seen)
            if len(done) == len(pending):
                break
        workers = ray.get(pending)
        seconds = time.perf_counter() - t0
        summary = internal_api.memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    finally:
        ray.shutdown()
    return _pass_figures(workers, seconds, seen, summary, before, users_per_batch)


def _pass_figures(workers, seconds, seen, summary, before, users_per_batch) -> dict:
    users, targets = sum(w["users"] for w in workers), sum(w["targets"] for w in workers)
    behaviours = targets + 3 * users  # every user of these presets has > 3 behaviours: N - 3 targets each
    consumer_pids = {w["pid"] for w in workers}
    others = sorted(((n, mb) for pid, (n, mb) in seen.items() if pid not in consumer_pids), key=lambda x: -x[1])
    return {
        "workers": 2,
        "consumer_cpus": CONSUMER_CPUS,
        "users_per_batch": users_per_batch,
        "targets_per_row": TARGETS_PER_ROW,
        "L": L,
        "users": users,
        "targets": targets,
        "behaviours": behaviours,
        "seconds": round(seconds, 1),
        "behaviours_per_s": round(behaviours / seconds),
        "targets_per_s": round(targets / seconds),
        "per_worker": workers,
        "peak_rss_mb": {
            "driver": vm_hwm_mb(),
            "consumers": [w["peak_rss_mb"] for w in workers],
            "other_node_processes_top": [{"name": n, "mb": mb} for n, mb in others[:6]],
            "node_total_of_peaks_mb": round(sum(mb for _, mb in seen.values()), 1),
        },
        "object_store_mib": OBJECT_STORE_BYTES // 1024**2,
        "spill": spilled(summary),
        "memory_summary_tail": summary.strip().splitlines()[-6:],
        "loadavg_before": before,
        "loadavg_after": load(),
    }


def baseline(data: Path, users: int, users_per_batch: int) -> dict:
    """Per-target against user-level collate over the first `users` users, in this process (no Ray)."""
    cfg = sample_config(data, max_len=L, samples_per_user=0, num_neg=4)
    table = pq.read_table(table_path(data, "sequences")).slice(0, users)
    batches = table.to_batches(max_chunksize=users_per_batch)
    out: dict = {"users": users, "behaviours": int(sum(len(x) for x in table.column("item_ids").to_pylist()))}
    for name, tpr in (("user_level", TARGETS_PER_ROW), ("per_target", 0)):
        collate = TrainCollate(cfg, 0, targets_per_row=tpr)
        before, t0, targets, ids = load(), time.perf_counter(), 0, 0
        for b in batches:
            batch = collate(b)
            key = "target_valid" if tpr else "labels"
            targets += int(batch[key].sum()) if tpr else int(batch[key].shape[0])
            ids += sum(int(v.numel()) for k, v in batch.items() if k.endswith(("items", "queries")))
        seconds = time.perf_counter() - t0
        out[name] = {
            "seconds": round(seconds, 2),
            "targets": targets,
            "targets_per_s": round(targets / seconds),
            "ids_per_target": round(ids / max(targets, 1), 1),
            "loadavg_before": before,
            "loadavg_after": load(),
        }
    out["user_level_speedup"] = round(out["user_level"]["targets_per_s"] / out["per_target"]["targets_per_s"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by this node's workers: one torch thread each
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5,000 users of the large preset's shape")
    p.add_argument("--users", type=int, help="users of the large preset (default: all, or 5,000 with --quick)")
    p.add_argument("--data", type=Path, help="where the prepared data goes (default /work/data/large[_quick])")
    p.add_argument("--skip-prepare", action="store_true", help="use --data as already prepared")
    p.add_argument("--prepare-log", type=Path, help="with --skip-prepare: /usr/bin/time -v stderr of that prepare")
    p.add_argument("--users-per-batch", type=int, default=16)
    p.add_argument("--baseline-users", type=int, default=40, help="users of the per-target vs user-level subset")
    p.add_argument(
        "--baseline-users-per-batch",
        type=int,
        default=2,
        help="per-target batches hold [targets, L] ids: 2 users of ~1,500 targets at L = 2,000 are ~100 MB a batch",
    )
    p.add_argument("--out", type=Path, default=Path("bench/out/data_scale.json"))
    args = p.parse_args(argv)
    users = args.users or (5000 if args.quick else None)
    data = args.data or Path("/work/data/large_quick" if args.quick else "/work/data/large")
    result: dict = {"mode": "quick" if args.quick else "full", "data": str(data), "cpus": os.cpu_count()}
    if args.skip_prepare:
        result["prepare"] = timed_log(args.prepare_log, data) if args.prepare_log else {"skipped": True}
    else:
        log.info("preparing %s (%s users)", data, users or "all")
        result["prepare"] = prepare(data, users)
    save(args.out, result)  # after every stage: a later stage that fails or is stopped keeps the earlier figures
    log.info("collate pass over %s", data)
    result["collate_pass"] = collate_pass(data, args.users_per_batch)
    save(args.out, result)
    log.info("baseline over %d users", args.baseline_users)
    result["baseline_subset"] = baseline(data, args.baseline_users, args.baseline_users_per_batch)
    save(args.out, result)
    return 0


def save(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", out)


if __name__ == "__main__":
    sys.exit(main())
