"""The comparison of the paper's Tables 2 and 3: SEMINAR, its pretraining ablations, five baselines and rules.

One protocol for every row: the same validation users and the same --eval-neg test negatives per user (99, the
paper's; 100 for SASRec's published figures), drawn by --eval-seed and never by a model's seed (each row's
candidates digest is checked equal). Every model gets the same config, samples per user and stopping rule
(`checkpoints.stops_early`): SEMINAR, its ablations and every baseline train until validation NDCG@10 has not
improved for --patience epochs, at most --epochs, and keep their best epoch (`selection_score`); SEMINAR's PSU
pretrains for exactly --pretrain-epochs (its selection score is its epoch, so the rule never stops it) and keeps its
last epoch. The table reports the test split, mean ± std over seeds, and each row's epochs trained and best epoch;
the rules (Popularity, QueryMatch+Pop on derived queries, and on synthetic data the generator's own Oracle, the
ceiling) are deterministic.

    python jobs/compare.py --data data/small --out runs/compare --seeds 3
    python jobs/compare.py --data data/ml100k --out runs/ml100k --seeds 2 --samples-per-user 0 --epochs 50
    python jobs/compare.py --data data/games --out runs/games --eval-neg 100 --variants ''  # the rules only

A run is resumable: every finished (seed, variant) is kept in OUT/compare_partial.json and skipped when the same
command runs again. Processes may share one OUT (on 2 cores, one with --variants 'SEMINAR,w/o pretraining' and one
with --variants DIN,SIM,TWIN); `--report-only --variants` with every row then writes the table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jobs.common import add_eval_neg_flag, parse_overrides
from seminar_ray.data.splits import EVAL_SEED
from seminar_ray.errors import InputError
from seminar_ray.rule_rankers import TRUTH_FILE, evaluate_rule
from seminar_ray.runs import MAX_EPOCHS, PATIENCE
from seminar_ray.runtime import init_ray, run_cli, setup_logging

# name → (kind, PSU tasks to pretrain with, or None for no pretraining)
VARIANTS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "SEMINAR": ("seminar", ("next", "align", "rel")),
    "w/o pretraining": ("seminar", None),
    "w. align only": ("seminar", ("align",)),
    "w. next-pair only": ("seminar", ("next",)),
    "w. q-i relevance only": ("seminar", ("rel",)),
    "SIM": ("sim", None),
    "ETA": ("eta", None),
    "TWIN": ("twin", None),
    "QIN": ("qin", None),
    "DIN": ("din", None),
}
TABLE_KEYS = ("ndcg@5", "ndcg@10", "ndcg@50", "hr@10", "mrr", "auc")
TRAINING_KEYS = ("epochs", "best_epoch", "stopped_early")  # from each trained row's run summary


def train_seconds(summary: dict) -> float:
    """Seconds a run spent training, summed over its epochs' history: the same whether it ran in one process or
    resumed across several (validation and start-up excluded)."""
    return float(sum(h["train_seconds"] for h in summary["history"]))


def query_mode(data: Path) -> str:
    from seminar_ray.data.schema import DatasetMeta

    return DatasetMeta.load(data).extra.get("queries", "source")


def rule_rows(data: Path) -> dict[str, str]:
    """The rule rows of a table: popularity always, QueryMatch+Pop where the queries are derived from the items, and
    the Oracle (the ceiling) where the data is synthetic and carries its generator's truth."""
    return {
        "Popularity": "popularity",
        **({"QueryMatch+Pop": "querymatch_pop"} if query_mode(data) == "derived" else {}),
        **({"Oracle": "oracle"} if (data / TRUTH_FILE).exists() else {}),
    }


def _psu_cfg(base, tasks: tuple[str, ...], seed: int):
    return base.replace(seed=seed, use_next="next" in tasks, use_align="align" in tasks, use_rel="rel" in tasks)


def train_variant(name: str, seed: int, args, base, psu_runs: dict) -> dict:
    """Train one variant for one seed (local-mode Ray Train) and evaluate its best checkpoint on the test split."""
    from seminar_ray.train.evaluation import evaluate_checkpoint
    from seminar_ray.train.job import TrainJob, run_training

    kind, tasks = VARIANTS[name]
    storage = str(args.out.resolve() / f"seed{seed}")
    common = dict(
        data=str(args.data.resolve()),
        storage_path=storage,
        num_workers=0,
        samples_per_user=args.samples_per_user,
        user_level=not args.per_target,
        eval_users=args.eval_users,
        eval_seed=args.eval_seed,
        eval_neg=args.eval_neg,
        patience=args.patience,
    )
    pretrained, seconds = None, {}
    if tasks is not None:
        key = "psu_" + "_".join(tasks)
        if key not in psu_runs:
            psu = TrainJob(
                kind="psu",
                run_name=key,
                model=_psu_cfg(base, tasks, seed).to_dict(),
                epochs=args.pretrain_epochs,
                **common,
            )
            psu_runs[key] = run_training(psu)
        pretrained = psu_runs[key]["run_dir"]
        seconds["pretrain_seconds"] = train_seconds(psu_runs[key])
    run_name = name.replace(" ", "_").replace("/", "").replace(".", "")
    cfg = base.replace(seed=seed, pretrained=pretrained is not None)
    job = TrainJob(
        kind=kind, run_name=run_name, model=cfg.to_dict(), epochs=args.epochs, pretrained=pretrained, **common
    )
    summary = run_training(job)
    test = evaluate_checkpoint(
        summary["run_dir"], "test", actors=1, eval_seed=args.eval_seed, eval_neg=args.eval_neg, per_target=True
    )
    return {**test, **{k: summary[k] for k in TRAINING_KEYS}, "train_seconds": train_seconds(summary), **seconds}


def record_finished(partial: Path, key: str, result: dict) -> dict[str, dict]:
    """Add one finished (seed, variant) to OUT/compare_partial.json and return every row finished so far.

    The file is re-read under an exclusive lock before it is rewritten, so several compare processes may share one
    --out (one per core, each with its own --variants) without one overwriting another's rows.
    """
    from seminar_ray import storage

    with open(partial.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = json.loads(partial.read_text()) if partial.exists() else {}
        done[key] = result
        storage.write_text(partial, json.dumps(done, indent=1))
    return done


def aggregate(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    return {
        name: {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))) for k in TABLE_KEYS}
        for name, runs in per_seed.items()
    }


def markdown(agg: dict, names: Sequence[str], title: str) -> str:
    """A table without outer pipes (GitHub renders it the same), so a row of six metrics fits in 120 columns."""
    head = f"### {title}\n\nmethod | " + " | ".join(TABLE_KEYS) + "\n" + "---|" * len(TABLE_KEYS) + "---\n"
    rows = "".join(f"{n} | " + " | ".join(cell(*agg[n][k]) for k in TABLE_KEYS) + "\n" for n in names if n in agg)
    return head + rows


def cell(mean: float, std: float) -> str:
    """ "0.3653 ±.0022": mean ± std in 13 characters, so a six-metric row stays within 120 columns."""
    return f"{mean:.4f} ±{std:.4f}".replace("±0.", "±.")


def wrap_prose(text: str, width: int = 118) -> str:
    """Markdown with every line that is not a table row wrapped to `width` columns (list items keep their dash)."""
    out = []
    for line in text.split("\n"):
        if " | " in line or len(line) <= width:
            out.append(line)
        else:
            indent = "  " if line.startswith("- ") else ""
            out.append(textwrap.fill(line, width, subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(out)


def budget(args: argparse.Namespace) -> str:
    """What every trained row got: config, samples per user and the stopping rule."""
    return (
        f"Config {' '.join([args.config.name, *args.set])}, samples per user {args.samples_per_user or 'all'}. "
        f"Stopping rule: every model trains until validation NDCG@10 has not improved for {args.patience} epochs, "
        f"at most {args.epochs}, and keeps its best epoch; the PSU pretrains {args.pretrain_epochs} epochs."
    )


def training_lines(per_seed: dict[str, list[dict]]) -> str:
    """Per trained row: epochs trained and the best (kept) epoch of each seed, whether the rule stopped it, and the
    minutes it trained (its PSU's pretraining apart) where the row recorded them."""
    lines = []
    for name, runs in per_seed.items():
        if runs and all("epochs" in r for r in runs):  # rows recorded before the stopping rule lack them
            lines.append(f"- {name}: " + ", ".join(_run_line(r) for r in runs))
    head = "\nEpochs trained per seed (best epoch; minutes of training, PSU pretraining apart):\n\n"
    return head + "\n".join(lines) + "\n" if lines else ""


def _run_line(r: dict) -> str:
    """ "25 (best 20, 160 min + PSU 11 min)" for one seed of one row."""
    parts = [f"best {r['best_epoch']}"] + ([] if r["stopped_early"] else ["hit the cap"])
    if "train_seconds" in r:  # rows recorded before the times were kept lack them
        parts.append(f"{r['train_seconds'] / 60:.0f} min")
        if "pretrain_seconds" in r:
            parts[-1] += f" + PSU {r['pretrain_seconds'] / 60:.0f} min"
    return f"{r['epochs']} ({', '.join(parts)})"


def verdict(agg: dict, seeds: int) -> list[str]:
    """Does SEMINAR beat the no-pretraining ablation and every baseline on NDCG@10 by more than the seed std? (The
    Oracle is the ceiling, not a competitor.)"""
    if seeds < 2:
        return ["one seed: no seed-to-seed spread to judge a difference against"]
    lines = []
    m, s = agg["SEMINAR"]["ndcg@10"]
    for other in [n for n in agg if n not in ("SEMINAR", "Oracle") and not n.startswith("w. ")]:
        om, os_ = agg[other]["ndcg@10"]
        margin = max(s, os_)
        lines.append(
            f"SEMINAR {m:.4f} vs {other} {om:.4f}: "
            f"{'beats' if m - om > margin else 'does NOT beat'} it by more than the seed std ({margin:.4f})"
        )
    return lines


def paired(per_seed: dict[str, list[dict]]) -> list[str]:
    """SEMINAR against each other trained row on the same test targets: the mean difference of the targets' NDCG@10
    (each target's averaged over seeds) ± its standard error (`metrics.paired_difference`), where both rows kept
    their targets' figures (rows recorded before they were kept, and the rules, have none)."""
    from seminar_ray.metrics import paired_difference

    if "SEMINAR" not in per_seed or not _kept_targets(per_seed["SEMINAR"]):
        return []
    users, mine = _seed_mean(per_seed["SEMINAR"])
    lines = []
    for other, runs in per_seed.items():
        if other == "SEMINAR" or not _kept_targets(runs):
            continue
        their_users, theirs = _seed_mean(runs)
        if their_users != users:
            raise RuntimeError(f"SEMINAR and {other} kept figures of different test targets: cannot pair them")
        diff, se = paired_difference(mine, theirs)
        lines.append(
            f"SEMINAR − {other}: {diff:+.4f} ± {se:.4f} NDCG@10 (paired over the {len(users)} test targets, "
            f"{len(runs)} seed(s) averaged; ± one standard error)"
        )
    return lines


def _kept_targets(runs: list[dict]) -> bool:
    return bool(runs) and all("per_target" in r for r in runs)


def _seed_mean(runs: list[dict]) -> tuple[list[int], np.ndarray]:
    """(the targets' user ids, each target's NDCG@10 averaged over the seeds); every seed must hold the same users."""
    users = runs[0]["per_target"]["user_id"]
    if any(r["per_target"]["user_id"] != users for r in runs):
        raise RuntimeError("the seeds of one row kept figures of different test targets")
    return users, np.mean([r["per_target"]["ndcg@10"] for r in runs], axis=0)


def main(argv: list[str] | None = None) -> int:
    from seminar_ray.models import ModelConfig

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=MAX_EPOCHS, help="the cap on every model's epochs (the stopping rule)")
    p.add_argument(
        "--patience",
        type=int,
        default=PATIENCE,
        help="stop a model once validation NDCG@10 has not improved for this many epochs (0 = train to --epochs)",
    )
    p.add_argument("--pretrain-epochs", type=int, default=2, help="PSU pretraining epochs, always all of them")
    p.add_argument("--samples-per-user", type=int, default=0, help="training targets per user per epoch; 0 = all")
    p.add_argument("--per-target", action="store_true", help="per-target batches instead of user-level ones")
    p.add_argument("--eval-users", type=int, default=500, help="validation users, a fixed set drawn by --eval-seed")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="seed of the evaluation users and negatives")
    add_eval_neg_flag(p, "validation and test")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields, e.g. lr=0.003")
    p.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "model_small.yaml")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset; empty: the rule rows only")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the seeds that OUT/compare_partial.json holds for every variant",
    )
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise InputError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    init_ray()
    base = ModelConfig.from_yaml(args.config, **parse_overrides(args.set))
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "compare_partial.json"  # every finished (seed, variant): a re-run skips them
    done: dict[str, dict] = json.loads(partial.read_text()) if partial.exists() else {}
    t0, load_start = time.time(), os.getloadavg()
    if args.report_only:
        complete = [s for s in range(args.seeds) if all(f"{s}/{n}" in done for n in names)]
        if not complete:
            raise InputError(f"{partial}: no seed has every variant finished; run without --report-only")
        args.seeds = len(complete)
        done = {f"{i}/{n}": done[f"{s}/{n}"] for i, s in enumerate(complete) for n in names}
    for seed in range(args.seeds):
        psu_runs: dict = {}
        for name in names:
            key = f"{seed}/{name}"
            if key in done:
                continue
            start = time.time()
            done = record_finished(partial, key, train_variant(name, seed, args, base, psu_runs))
            print(
                f"[compare] seed {seed} {name}: test ndcg@10 {done[key]['ndcg@10']:.4f} "
                f"({time.time() - start:.0f}s, {time.time() - t0:.0f}s total)",
                flush=True,
            )
    per_seed: dict[str, list[dict]] = {n: [done[f"{s}/{n}"] for s in range(args.seeds)] for n in names}
    for name, rule in rule_rows(args.data).items():
        per_seed[name] = [evaluate_rule(rule, args.data, "test", args.eval_seed, args.eval_neg)] * args.seeds
    digests = sorted({r["candidates_digest"] for runs in per_seed.values() for r in runs})
    if len(digests) != 1:
        raise RuntimeError(f"rows ranked different candidate lists (digests {digests}): the protocol is broken")
    agg = aggregate(per_seed)
    table2 = [
        n
        for n in (
            "Popularity",
            "QueryMatch+Pop",
            "DIN",
            "SIM",
            "QIN",
            "ETA",
            "TWIN",
            "SEMINAR",
            "w/o pretraining",
            "Oracle",
        )
        if n in agg
    ]
    table3 = [
        n
        for n in ("SEMINAR", "w/o pretraining", "w. align only", "w. next-pair only", "w. q-i relevance only")
        if n in agg
    ]
    text = (
        f"# Comparison on {args.data} ({args.seeds} seeds, test split, mean ± std)\n\n"
        f"Queries: {query_mode(args.data)}. Every row ranks the same candidates, the positive against "
        f"{args.eval_neg} sampled negatives: eval seed {args.eval_seed}, digest {digests[0]}. "
        + (budget(args) if names else "")
        + "\n\n"
        + markdown(agg, table2, "Table 2: SEMINAR against the baselines")
        + "\n"
        + (markdown(agg, table3, "Table 3: ablation of the PSU pretraining tasks") + "\n" if table3 else "")
        + ("\n".join(f"- {v}" for v in verdict(agg, args.seeds) + paired(per_seed)) + "\n" if "SEMINAR" in agg else "")
        + training_lines(per_seed)
        + ("" if args.report_only else f"\n{time.time() - t0:.0f} s in all.\n")
    )
    (args.out / "compare.md").write_text(wrap_prose(text))
    (args.out / "compare.json").write_text(
        json.dumps(
            {
                "seeds": args.seeds,
                "data": str(args.data),
                "aggregate": agg,
                "eval_seed": args.eval_seed,
                "eval_neg": args.eval_neg,
                "candidates_digest": digests[0],
                "per_seed": {
                    n: [{k: v for k, v in r.items() if k != "per_target"} for r in runs] for n, runs in per_seed.items()
                },
                "seconds": time.time() - t0,
                "load_avg": {"start": load_start, "end": os.getloadavg()},  # 1, 5, 15 min: how busy the machine was
            },
            indent=1,
        )
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
