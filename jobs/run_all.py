"""`make run`: the whole system end to end on an embedded local Ray, at a small default scale.

prepare (synthetic) → pretrain PSU → fine-tune SEMINAR → evaluate on test → build the PQ index →
serve over HTTP on 127.0.0.1 and score one request. Every stage is the same job a cluster user
submits with `ray job submit`; here they share one Ray session to save start-up time.

    python jobs/run_all.py --out runs/demo --scale small
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from seminar_ray.errors import InputError
from seminar_ray.runtime import init_ray, run_cli, setup_logging

STAGES = ("prepare", "pretrain", "finetune", "evaluate", "index", "serve")


def _stage(name: str, fn, *args) -> float:
    print(f"\n=== {name} ===", flush=True)
    t0 = time.time()
    code = fn(*args)
    if code not in (0, None):
        raise SystemExit(f"stage {name} failed with exit code {code}")
    seconds = time.time() - t0
    print(f"=== {name} done in {seconds:.0f}s ===", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--scale", default="small", help="synthetic preset: tiny, small, medium, large")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (0 = local mode)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise InputError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    out = args.out.resolve()
    data, runs = out / "data", out / "runs"
    init_ray(quiet=False)
    from jobs import build_index, evaluate, finetune, prepare_data, pretrain

    train = ["--data", str(data), "--out", str(runs), "--num-workers", str(args.num_workers), "--eval-users", "500"]
    timings = {}
    t0 = time.time()
    if "prepare" in stages:
        timings["prepare"] = _stage(
            "prepare", prepare_data.main, ["--source", "synthetic", "--scale", args.scale, "--out", str(data)]
        )
    if "pretrain" in stages:
        timings["pretrain"] = _stage("pretrain", pretrain.main, train + ["--epochs", str(args.pretrain_epochs)])
    if "finetune" in stages:
        timings["finetune"] = _stage(
            "finetune",
            finetune.main,
            train + ["--model", "seminar", "--epochs", str(args.epochs), "--pretrained", str(runs / "psu")],
        )
    if "evaluate" in stages:
        timings["evaluate"] = _stage(
            "evaluate",
            evaluate.main,
            ["--checkpoint", str(runs / "seminar"), "--split", "test", "--out", str(out / "eval")],
        )
    if "index" in stages:
        timings["index"] = _stage(
            "index",
            build_index.main,
            ["--checkpoint", str(runs / "seminar"), "--data", str(data), "--out", str(out / "index")],
        )
    if "serve" in stages:
        from jobs import serve_demo

        timings["serve"] = _stage(
            "serve",
            serve_demo.main,
            ["--checkpoint", str(runs / "seminar"), "--index", str(out / "index"), "--data", str(data)],
        )
    timings["total"] = time.time() - t0
    print("\n=== summary ===")
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))
    print(
        f"data: {data}\nruns: {runs} (metrics.json and curves.png per run)\ntest metrics: {out / 'eval' / 'metrics.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
