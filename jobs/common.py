"""Flags shared by the training jobs and the one place a TrainJob is built from them (docs/design.md, Model contracts:
checkpoints)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seminar_ray.data.splits import EVAL_NEG, EVAL_SEED
from seminar_ray.errors import InputError
from seminar_ray.models import ModelConfig
from seminar_ray.runs import MAX_EPOCHS, PATIENCE
from seminar_ray.train.job import TrainJob

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model_small.yaml"


def add_train_flags(p: argparse.ArgumentParser, model_choices: tuple[str, ...] | None = None) -> None:
    p.add_argument(
        "--data", required=True, help="directory written by jobs/prepare_data.py: local, NFS or a shared URI"
    )
    p.add_argument("--out", required=True, help="storage path for runs: a local directory or a shared URI")
    p.add_argument("--run-name", help="re-running with the same name resumes from its latest checkpoint")
    p.add_argument(
        "--epochs",
        type=int,
        default=MAX_EPOCHS if model_choices else None,
        help=f"PSU: the epochs it pretrains (default: the config's epochs, 1); CTR models: the cap (default "
        f"{MAX_EPOCHS}), the stopping rule ends the run once validation NDCG@10 stops improving",
    )
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers; 0 = local mode in this process")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument(
        "--worker-resources",
        type=json.loads,
        default={},
        metavar="JSON",
        help="extra resources per worker that steer it to a node type, e.g. '{\"gpu_trainer\": 0.01}' (cluster.yaml)",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model YAML (configs/)")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields, e.g. K=64 lam=0.3"
    )
    p.add_argument(
        "--samples-per-user",
        type=int,
        default=0,
        help="training targets drawn per user per epoch (0, the default: every training position)",
    )
    p.add_argument(
        "--per-target",
        action="store_true",
        help="train on per-target batches (a copy of the history per target) instead of user-level ones",
    )
    p.add_argument("--max-failures", type=int, default=2, help="worker failures tolerated before the run fails")
    p.add_argument(
        "--eval-users",
        type=int,
        default=0,
        help="validate on a fixed set of this many users, the same every epoch (0 = all)",
    )
    p.add_argument(
        "--eval-seed",
        type=int,
        default=EVAL_SEED,
        help="seed of the validation users and negatives, independent of --seed (recorded per epoch)",
    )
    add_eval_neg_flag(p, "validation")
    p.add_argument("--seed", type=int, default=None)
    if model_choices:  # CTR models: the stopping rule applies (a PSU pretrains for its stated epochs)
        p.add_argument("--model", choices=model_choices, default=model_choices[0])
        p.add_argument(
            "--patience",
            type=int,
            default=PATIENCE,
            help="stop once validation NDCG@10 has not improved for this many epochs, keeping the best epoch "
            "(0 = train every --epochs); --epochs is the cap",
        )


def add_eval_neg_flag(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument(
        "--eval-neg",
        type=int,
        default=EVAL_NEG,
        help=f"sampled negatives ranked against each {split} target (default {EVAL_NEG}, the paper's; SASRec's "
        "published figures use 100); recorded in metrics.json",
    )


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def job_from_args(args: argparse.Namespace, kind: str, pretrained: str | None = None) -> TrainJob:
    overrides = parse_overrides(args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if kind == "seminar":
        overrides.setdefault("pretrained", pretrained is not None)
    cfg = ModelConfig.from_yaml(args.config, **overrides)
    return TrainJob(
        kind=kind,
        data=_storage(args.data),
        storage_path=_storage(args.out),
        run_name=args.run_name or kind,
        model=cfg.to_dict(),
        epochs=cfg.epochs,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.use_gpu,
        worker_resources=args.worker_resources,
        samples_per_user=args.samples_per_user,
        user_level=not args.per_target,
        max_failures=args.max_failures,
        pretrained=pretrained,
        eval_users=args.eval_users,
        eval_seed=args.eval_seed,
        eval_neg=args.eval_neg,
        patience=args.patience if kind != "psu" else 0,
    )


def _storage(out: str) -> str:
    return out if "://" in out else str(Path(out).resolve())


def print_summary(summary: dict) -> None:
    best = summary["best"]
    stopped = f" (stopped early: {summary['patience']} epochs without a better one)" if summary["stopped_early"] else ""
    print(
        f"run {summary['run_dir']}: {summary['epochs']} epochs{stopped}, best epoch {summary['best_epoch']} "
        f"(valid ndcg@10 {best['ndcg@10']:.4f}, hr@10 {best['hr@10']:.4f}, mrr {best['mrr']:.4f}, "
        f"auc {best['auc']:.4f})"
    )
    print(f"best checkpoint: {summary['best_checkpoint']}")
    print(f"metrics: {summary['run_dir']}/metrics.json  curves: {summary['run_dir']}/curves.png")
