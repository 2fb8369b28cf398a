"""Issue 23, item 7: SEMINAR on MovieLens-100K --queries none, the per-target path against the user-level path under
the same wall-clock budget.

    python -m bench.ml100k_user_level [--quick] [--seeds 1] [--work /work/data/ml100k_ul]

Both arms are `jobs.compare --variants SEMINAR` (PSU pretraining, then fine-tuning under the stopping rule, test
split, 99 sampled negatives, every validation user) with the ml100k config (L = 100, K = 50) and every training
position each epoch (--samples-per-user 0). The per-target arm (--per-target) is the previous best setting: 8 epochs,
2 pretraining epochs. It runs first and its wall time is the budget; the user-level arm then runs with
--ul-epochs as its cap (and --ul-pretrain-epochs), and the result says whether its wall time stayed within the
budget (`within_budget`). Each arm is timed as one process (Ray start-up, pretraining, fine-tuning, test evaluation
and the Popularity row included), with the load average before and after it; per-epoch training seconds come from
each run's metrics.json. Writes bench/out/ml100k_user_level.{json,md} (--quick: ml100k_user_level_quick.*): measured
numbers only. The data and runs go under --work (never the repo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.compare_ml100k import WHEEL, fetch_ml100k
from jobs.compare import wrap_prose

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "model_ml100k.yaml"
KEYS = ("ndcg@10", "hr@10", "ndcg@5", "mrr", "auc")


def _run_summary(run_dir: Path) -> dict:
    """Epochs, best epoch and per-epoch training seconds of one finished run (its metrics.json)."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {
        "epochs": summary["epochs"],
        "best_epoch": summary["best_epoch"],
        "stopped_early": summary["stopped_early"],
        "run_seconds": summary["seconds"],
        "epoch_train_seconds": [round(h["train_seconds"], 1) for h in summary["history"]],
        "train_targets_per_epoch": summary["history"][0]["train_samples"] if summary["history"] else None,
        "valid_ndcg@10": [round(h["ndcg@10"], 4) for h in summary["history"] if "ndcg@10" in h],
    }


def arm(name: str, data: Path, out: Path, seeds: int, epochs: int, pretrain_epochs: int, per_target: bool) -> dict:
    """One arm: jobs.compare in a fresh process, timed, with the load average around it."""
    cmd = [
        sys.executable, "-m", "jobs.compare", "--data", str(data), "--out", str(out), "--seeds", str(seeds),
        "--epochs", str(epochs), "--pretrain-epochs", str(pretrain_epochs), "--samples-per-user", "0",
        "--eval-users", "0", "--config", str(CONFIG), "--variants", "SEMINAR",
        *(["--per-target"] if per_target else []),
    ]  # fmt: skip
    print("+", " ".join(cmd), flush=True)  # noqa: T201
    load0, t0 = os.getloadavg(), time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds, load1 = time.time() - t0, os.getloadavg()
    result = json.loads((out / "compare.json").read_text())
    agg = result["aggregate"]
    runs = {
        f"seed{s}": {
            "psu": _run_summary(out / f"seed{s}" / "psu_next_align_rel"),
            "seminar": _run_summary(out / f"seed{s}" / "SEMINAR"),
        }
        for s in range(seeds)
    }
    return {
        "path": name,
        "command": " ".join(cmd[1:]),
        "wall_seconds": round(seconds, 1),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in load1],
        "epochs_cap": epochs,
        "pretrain_epochs": pretrain_epochs,
        "seminar": {k: agg["SEMINAR"][k] for k in KEYS},
        "popularity": {k: agg["Popularity"][k][0] for k in KEYS},
        "candidates_digest": result.get("candidates_digest"),
        "runs": runs,
    }


def markdown(res: dict) -> str:
    pt, ul = res["per_target"], res["user_level"]
    rows = []
    for a in (pt, ul):
        epochs = ", ".join(f"{r['seminar']['epochs']} (best {r['seminar']['best_epoch']})" for r in a["runs"].values())
        ep_s = [s for r in a["runs"].values() for s in r["seminar"]["epoch_train_seconds"]]
        rows.append(
            f"| SEMINAR, {a['path']} | {a['seminar']['ndcg@10'][0]:.4f} ± {a['seminar']['ndcg@10'][1]:.4f} | "
            f"{a['seminar']['hr@10'][0]:.4f} ± {a['seminar']['hr@10'][1]:.4f} | {a['pretrain_epochs']} | "
            f"{epochs} | {sum(ep_s) / max(len(ep_s), 1):.0f} | {a['wall_seconds'] / 60:.1f} | "
            f"{a['loadavg_start'][0]:.1f} → {a['loadavg_end'][0]:.1f} |"
        )
    pop = pt["popularity"]
    rows.append(f"| Popularity | {pop['ndcg@10']:.4f} | {pop['hr@10']:.4f} | | | | | |")
    return (
        f"# MovieLens-100K, --queries none: per-target against user-level training, same wall-clock budget\n\n"
        f"Data: RecBole atomic files from {WHEEL}; config {CONFIG.name} (L = 100, K = 50); every training position "
        f"each epoch; {res['seeds']} seed(s); test split, the positive against 99 sampled negatives (digest "
        f"{pt['candidates_digest']}); stopping rule: patience 5 on validation NDCG@10 (every user), best epoch kept. "
        f"Budget: the per-target arm's wall time ({pt['wall_seconds'] / 60:.1f} min); the user-level arm "
        f"{'stayed within it' if res['within_budget'] else 'went OVER it'} "
        f"({ul['wall_seconds'] / 60:.1f} min). Wall time = one process: Ray start, PSU pretraining, fine-tuning, "
        f"test evaluation, Popularity. {os.cpu_count()}-core machine shared with other jobs (load average "
        f"1-minute, start → end).\n\n"
        "| method | NDCG@10 | HR@10 | pretrain epochs | fine-tune epochs (best) | s per fine-tune epoch | "
        "wall min | load |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Written by `python -m bench.ml100k_user_level{' --quick' if res['quick'] else ''}` "
        f"(commands in the JSON).\n"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/work/data/ml100k_ul"), help="data and runs (not the repo)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--pt-epochs", type=int, default=8, help="per-target arm: epochs (the previous best setting)")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="per-target arm: PSU pretraining epochs")
    p.add_argument("--ul-epochs", type=int, default=30, help="user-level arm: the epoch cap")
    p.add_argument("--ul-pretrain-epochs", type=int, default=2, help="user-level arm: PSU pretraining epochs")
    p.add_argument("--arms", default="per_target,user_level", help="run only some arms (the others are re-read)")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch and 1 pretraining epoch per arm")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.pt_epochs, args.pretrain_epochs, args.ul_epochs, args.ul_pretrain_epochs = 1, 1, 1, 1, 1
    out = args.out or ROOT / "bench" / "out" / ("ml100k_user_level_quick" if args.quick else "ml100k_user_level")
    raw = fetch_ml100k(args.work)
    data = args.work / "data-none"
    if not (data / "meta.json").exists():
        subprocess.run(
            [sys.executable, "-m", "jobs.prepare_data", "--source", "recbole", "--input", str(raw),
             "--out", str(data), "--queries", "none"],
            check=True, cwd=ROOT,
        )  # fmt: skip
    tag = "-quick" if args.quick else ""
    arms = args.arms.split(",")
    partial = out.with_suffix(".partial.json")
    res: dict = json.loads(partial.read_text()) if partial.exists() else {}
    if "per_target" in arms:
        res["per_target"] = arm(
            "per-target", data, args.work / f"per-target{tag}", args.seeds, args.pt_epochs, args.pretrain_epochs, True
        )
        partial.write_text(json.dumps(res, indent=1))
    if "user_level" in arms:
        res["user_level"] = arm(
            "user-level", data, args.work / f"user-level{tag}", args.seeds, args.ul_epochs, args.ul_pretrain_epochs,
            False,
        )  # fmt: skip
        partial.write_text(json.dumps(res, indent=1))
    if "per_target" not in res or "user_level" not in res:
        print(f"partial result in {partial}")  # noqa: T201
        return 0
    res.update(
        seeds=args.seeds,
        quick=args.quick,
        within_budget=res["user_level"]["wall_seconds"] <= res["per_target"]["wall_seconds"],
        cpus=os.cpu_count(),
    )
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(wrap_prose(markdown(res)))
    partial.unlink()
    print(out.with_suffix(".md").read_text())  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
