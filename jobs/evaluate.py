"""Evaluate a checkpoint (or a run directory's best) on the validation or test targets.

    python jobs/evaluate.py --checkpoint runs/seminar --split test --out runs/seminar/eval
    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint /shared/runs/seminar --split test --out
    /shared/eval

Writes OUT/metrics.json: HR@K, NDCG@K (K = 1, 5, 10, 50), MRR, AUC, gAUC, overall, per target type and per
history length (the behaviours before the target: 0-4, 5-9, 10-19, ...).
"""

from __future__ import annotations

import argparse
import sys

from seminar_ray.data.splits import EVAL_SEED
from seminar_ray.runtime import init_ray, run_cli, setup_logging
from seminar_ray.train.evaluation import evaluate_checkpoint, metrics_table, write_metrics


def table_rows(metrics: dict) -> dict[str, dict]:
    """Overall, per target type and per history length (AUC and gAUC are overall only)."""
    nan = {"auc": float("nan"), "gauc": float("nan")}
    lengths = {f"history {k} ({m['targets']})": m | nan for k, m in metrics.get("by_history_length", {}).items()}
    return {"all": metrics, **{k: metrics[k] | nan for k in ("search", "browse") if k in metrics}, **lengths}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (→ its best)")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--out", required=True, help="directory for metrics.json: local, NFS or a shared URI")
    p.add_argument("--data", help="default: the data directory the checkpoint was trained on (local, NFS or URI)")
    p.add_argument("--actors", type=int, default=2, help="scoring actors (0.5 CPU each)")
    p.add_argument(
        "--eval-seed",
        type=int,
        default=EVAL_SEED,
        help="seed of the negatives per user; keep it fixed to compare models (recorded in metrics.json)",
    )
    p.add_argument(
        "--eval-neg",
        type=int,
        default=None,
        help="sampled negatives per target (default: as many as the run was validated with, else 99; SASRec's "
        "published figures use 100); recorded in metrics.json",
    )
    args = p.parse_args(argv)
    init_ray()
    metrics = evaluate_checkpoint(
        args.checkpoint, args.split, args.data, actors=args.actors, eval_seed=args.eval_seed, eval_neg=args.eval_neg
    )
    path = write_metrics(metrics, args.out)
    print(metrics_table(table_rows(metrics)))
    targets = f"{metrics['targets']} targets, {metrics['eval_neg']} negatives each"
    print(f"{metrics['model']} on {args.split} ({targets}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
