"""`make run`: the whole system end to end on an embedded local Ray, at a small default scale.

prepare (synthetic) → pretrain PSU → fine-tune SEMINAR → evaluate on test → build the PQ index →
serve over HTTP on 127.0.0.1 and score one request. Every stage is the same job a cluster user
submits with `ray job submit`; here they share one Ray session to save start-up time. Ray's own log
lines go to OUT/logs/ (--verbose shows them); the run ends with one summary.

    python -m jobs.run_all --out runs/demo --scale small
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


def _stage(name: str, fn, *args):
    """Run one stage; (seconds, what it returned)."""
    print(f"\n=== {name} ===", flush=True)
    t0 = time.time()
    result = fn(*args)
    if isinstance(result, int) and result != 0:
        raise SystemExit(f"stage {name} failed with exit code {result}")
    seconds = time.time() - t0
    print(f"=== {name} done in {seconds:.0f}s ===", flush=True)
    return seconds, result


def summary(out: Path, timings: dict[str, float], exchange: dict | None) -> str:
    """Stage times, the test metrics table, the scored request and its answer, and where the outputs are."""
    from jobs.evaluate import table_rows
    from seminar_ray.train.evaluation import metrics_table

    lines = ["", "=== summary ===", "stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())]
    metrics_file = out / "eval" / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        lines += [
            f"test metrics ({metrics['model']}, {metrics['targets']} targets):",
            metrics_table(table_rows(metrics)),
        ]
    if exchange is not None:
        response = exchange["response"]
        scores = response.get("scores")
        shown = [round(s, 4) for s in scores] if isinstance(scores, list) else response
        lines += [
            f"scored request: user {exchange['request']['user_id']}, query {exchange['request']['query']}, "
            f"candidates {exchange['request']['candidates']}",
            f"answer (HTTP {exchange['status']}): scores {shown}",
        ]
    lines += [
        f"outputs: data {out / 'data'}",
        f"         runs {out / 'runs'} (metrics.json and curves.png per run)",
        f"         test metrics {metrics_file}, index {out / 'index'}",
        f"         Ray's logs {out / 'logs'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--scale", default="small", help="synthetic preset: tiny, small, medium, long, large")
    # Training is user-level over every position (the jobs' defaults): an epoch trains ~15x the targets of the old
    # 8 per user. Chosen on validation NDCG@10 (500 users) among settings that keep `make run` no slower than the old
    # 2 + 3 epochs of 8 per user (0.50-0.51, 468-590 s): pretraining 1 + fine-tuning 2 epochs 0.644 (307 s),
    # 1 + 1 0.526 (320 s), 2 + 1 0.57-0.58 (491 s); 2 + 3 reached 0.69 but took 547 s (issue 23, item 5).
    p.add_argument("--pretrain-epochs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (the cap of the stopping rule)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (0 = local mode)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the serve stage (127.0.0.1)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines too (else they go to OUT/logs)")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise InputError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    out = args.out.resolve()
    setup_logging(args.verbose, log_dir=out / "logs")
    data, runs = out / "data", out / "runs"
    init_ray(quiet=False)
    from jobs import build_index, evaluate, finetune, prepare_data, pretrain, serve_demo

    train = ["--data", str(data), "--out", str(runs), "--num-workers", str(args.num_workers), "--eval-users", "500"]
    timings: dict[str, float] = {}
    exchange = None
    t0 = time.time()
    if "prepare" in stages:
        timings["prepare"], _ = _stage(
            "prepare", prepare_data.main, ["--source", "synthetic", "--scale", args.scale, "--out", str(data)]
        )
    if "pretrain" in stages:
        timings["pretrain"], _ = _stage("pretrain", pretrain.main, train + ["--epochs", str(args.pretrain_epochs)])
    if "finetune" in stages:
        timings["finetune"], _ = _stage(
            "finetune",
            finetune.main,
            train + ["--model", "seminar", "--epochs", str(args.epochs), "--pretrained", str(runs / "psu")],
        )
    if "evaluate" in stages:
        timings["evaluate"], _ = _stage(
            "evaluate",
            evaluate.main,
            ["--checkpoint", str(runs / "seminar"), "--split", "test", "--out", str(out / "eval")],
        )
    if "index" in stages:
        timings["index"], _ = _stage(
            "index",
            build_index.main,
            ["--checkpoint", str(runs / "seminar"), "--data", str(data), "--out", str(out / "index")],
        )
    if "serve" in stages:
        serve_args = ["--checkpoint", str(runs / "seminar"), "--index", str(out / "index"), "--data", str(data)]
        timings["serve"], exchange = _stage(
            "serve", serve_demo.serve_and_score, serve_args + ["--port", str(args.port)]
        )
        if exchange["status"] != 200:
            raise SystemExit(f"stage serve: HTTP {exchange['status']}: {exchange['response']}")
    timings["total"] = time.time() - t0
    print(summary(out, timings, exchange), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
