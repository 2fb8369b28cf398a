"""Training targets/s of the user-level path (each user's window once, every target scored in one pass) against the
per-target path (a copy of the history per target), same run, same starting weights, same targets and candidates,
for PSU, SEMINAR and DIN at L = 2,000 (the paper config on the `long` synthetic preset) and at the small shape
(configs/model_small.yaml on the `small` preset).

Both paths train every position of the same users with the same optimizer step size (ModelConfig.batch targets per
micro-batch, seminar_ray.train.loop.train_one_epoch). Each (shape, model, path) runs in its own subprocess, so its
peak RSS is its own; the two paths of a model alternate so that the shared machine's load falls on both. One
torch.profiler step of each path is recorded for SEMINAR and the PSU at L = 2,000. The load average is recorded.

Every worker runs with the training processes' settings (`setup_training_process`: malloc keeps freed activations);
at L = 2,000 every (model, path) runs once more with glibc's default malloc, the before of that setting
(`malloc_speedup`: heap-kept targets/s over default targets/s, same run, same steps).
    .venv/bin/python -m bench.user_level --out bench/out/user_level.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from seminar_ray.data.entities import EntityTables
from seminar_ray.data.schema import DatasetMeta, read_table
from seminar_ray.data.splits import SampleConfig, SequenceBatch, train_batch, user_batch
from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir
from seminar_ray.models import ModelConfig, build_model
from seminar_ray.train.loop import WithLoss, make_optimizer, setup_training_process, train_one_epoch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHAPES = {  # name: (synthetic preset, model config, users: full / quick)
    "L2000": ("long", "model_paper.yaml", (6, 2)),
    "small": ("small", "model_small.yaml", (96, 48)),
}
KINDS = ("psu", "seminar", "din")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def batches(
    seqs: SequenceBatch,
    scfg: SampleConfig,
    path: str,
    users_per_step: int,
    targets_per_row: int,
    pool: np.ndarray | None,
) -> list[dict[str, torch.Tensor]]:
    """One epoch's steps: `users_per_step` users each, in the path's batch form (the same targets either way)."""
    out = []
    for start in range(0, len(seqs.user_id), users_per_step):
        part = SequenceBatch(
            user_id=seqs.user_id[start : start + users_per_step],
            queries=seqs.queries,
            items=seqs.items,
            offsets=seqs.offsets[start : start + users_per_step + 1],
        )
        b = user_batch(part, scfg, 0, targets_per_row, pool) if path == "user" else train_batch(part, scfg, 0, pool)
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()})
    return out


def worker(
    data: str, config: str, kind: str, path: str, users: int, max_targets: int, profile: bool, malloc: str
) -> dict:
    """Train `kind` from its seeded initial weights over `users` users' every position in `path`'s batch form, with
    the training processes' settings (`malloc` "kept") or glibc's default malloc ("default")."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    if malloc == "kept":
        setup_training_process(threads)
    else:
        torch.set_num_threads(threads)
    cfg = ModelConfig.from_yaml(CONFIGS / config, pretrained=False)
    tables = EntityTables.load(data)
    model = build_model(kind, cfg, tables)
    seqs = SequenceBatch.from_arrow(read_table(data, "sequences").slice(0, users))
    scfg = SampleConfig(
        max_len=cfg.max_len,
        num_items=DatasetMeta.load(data).num_items,
        num_neg=cfg.n_neg,
        samples_per_user=0,
        task="psu" if kind == "psu" else "ctr",
    )
    pool = np.asarray(seqs.queries[:10_000], dtype=np.int64) if kind == "psu" else None
    steps = batches(seqs, scfg, path, 1, min(cfg.batch, cfg.max_len), pool)
    if max_targets:  # the per-target path at L = 2,000 is slow: time the first max_targets targets of each user
        steps = [_first_targets(b, max_targets) for b in steps]
    net = WithLoss(model)
    opt = make_optimizer(net, cfg.lr, cfg.weight_decay)
    train_one_epoch(net, steps[:1], torch.optim.Adam(net.parameters()))  # warm-up
    model.load_state_dict(build_model(kind, cfg, tables).state_dict())
    rss0 = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    stats = train_one_epoch(net, steps, opt)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "kind": kind,
        "path": path,
        "malloc": malloc,
        "targets": stats["samples"],
        "seconds": wall,
        "cpu_seconds": cpu,
        "targets_per_s": stats["samples"] / wall,
        "targets_per_cpu_s": stats["samples"] / cpu,
        "loss": stats["loss"],
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_steps_mb": rss0,
        "window_columns": int(
            sum(b["seq_items"].numel() if path == "user" else b["hist_items"].numel() for b in steps)
        ),
    }
    if profile:
        out["profile_top_ops_self_cpu_s"] = _profile(net, opt, steps[0])
    return out


def _first_targets(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    if "seq_items" not in batch:
        return {k: v[:n] for k, v in batch.items()}
    valid = batch["target_valid"].clone()
    seen = valid.flatten().cumsum(0).view_as(valid)
    valid &= seen <= n
    rows = valid.any(1)
    return {
        **{k: v[rows] for k, v in batch.items()},
        "target_valid": valid[rows],
        "labels": (batch["labels"] * valid.unsqueeze(-1))[rows],
    }


def _profile(net, opt, batch, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_one_epoch(net, [batch], opt)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in events}


def run_worker(*args) -> dict:
    cmd = [sys.executable, "-m", "bench.user_level", "--worker", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(shape: str, quick: bool, tmp: Path) -> dict:
    preset, config, (full, short) = SHAPES[shape]
    users = short if quick else full
    data = generate_to_dir(SyntheticConfig.preset(preset, num_users=users), tmp / shape)
    per_target_cap = 512 if shape == "L2000" else 0  # targets per user on the (slow) per-target path at L = 2,000
    runs: dict[str, dict] = {}
    load = [os.getloadavg()[0]]
    for kind in KINDS:
        prof = kind in ("psu", "seminar")
        per = run_worker(data, config, kind, "target", users, per_target_cap, int(prof), "kept")
        user = run_worker(data, config, kind, "user", users, 0, int(prof), "kept")
        runs[kind] = {
            "per_target": per,
            "user_level": user,
            "speedup": user["targets_per_s"] / per["targets_per_s"],
            "speedup_cpu_time": user["targets_per_cpu_s"] / per["targets_per_cpu_s"],
        }
        if shape == "L2000":  # the before of setup_training_process's malloc setting, on the same steps
            before = {
                "per_target": run_worker(data, config, kind, "target", users, per_target_cap, 0, "default"),
                "user_level": run_worker(data, config, kind, "user", users, 0, 0, "default"),
            }
            runs[kind]["glibc_default_malloc"] = before
            runs[kind]["malloc_speedup_cpu_time"] = {
                p: runs[kind][p]["targets_per_cpu_s"] / before[p]["targets_per_cpu_s"] for p in before
            }
        load.append(os.getloadavg()[0])
        print(
            f"{shape} {kind}: user-level {user['targets_per_s']:.0f} targets/s, per-target "
            f"{per['targets_per_s']:.1f} targets/s: {runs[kind]['speedup']:.1f}x (load {load[-1]:.1f})",
            flush=True,
        )
    cfg = ModelConfig.from_yaml(CONFIGS / config)
    return {
        "L": cfg.max_len,
        "K": cfg.K,
        "batch": cfg.batch,
        "users": users,
        "per_target_targets_per_user_cap": per_target_cap or None,
        "user_level_speedup": {k: r["speedup"] for k, r in runs.items()},
        "user_level_speedup_cpu_time": {k: r["speedup_cpu_time"] for k, r in runs.items()},
        "peak_rss_mb": {k: {p: r[p]["peak_rss_mb"] for p in ("per_target", "user_level")} for k, r in runs.items()},
        "malloc_speedup_cpu_time": {
            k: r["malloc_speedup_cpu_time"] for k, r in runs.items() if "glibc_default_malloc" in r
        },
        "load_avg_1m": load,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out/user_level.json", help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="fewer users (2 at L = 2,000, 48 at the small shape)")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/bench_user_level"), help="where the synthetic data goes")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        data, config, kind, path, users, cap, prof, malloc = args.worker
        print(json.dumps(worker(data, config, kind, path, int(users), int(cap), bool(int(prof)), malloc)))
        return
    t0 = time.time()
    big = measure("L2000", args.quick, args.tmp)
    small = measure("small", args.quick, args.tmp)
    result = {
        "L": big["L"],
        "user_level_speedup": big["user_level_speedup"],
        "small": small["user_level_speedup"],
        "peak_rss_mb": big["peak_rss_mb"]["seminar"]["user_level"],
        "peak_rss_mb_by_model": big["peak_rss_mb"],
        "malloc_speedup_cpu_time": big["malloc_speedup_cpu_time"],
        "load_avg_1m": big["load_avg_1m"] + small["load_avg_1m"],
        "quick": args.quick,
        "wall_s": time.time() - t0,
        "shapes": {"L2000": big, "small": small},
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "shapes"}, indent=2))


if __name__ == "__main__":
    main()
