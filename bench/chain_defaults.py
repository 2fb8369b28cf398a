"""The README's job chain with default flags, as a new user runs it: pretrain, fine-tune, evaluate on the test split,
each `python jobs/X.py` in its own process, timed, beside the popularity rule on the same test candidates.

    python -m bench.chain_defaults --data DIR --work DIR [--out bench/out/chain_defaults_NAME.json] [-- FLAG ...]

DIR is a `jobs/prepare_data.py` output (for MovieLens-100K: `--source recbole --queries none`; docs/results.md
says where the file comes from). Flags after `--` go to both training jobs, to try other defaults the same way
(the JSON records them). Writes the stage seconds, the load average before and after each stage, the fine-tuning
run's validation NDCG@10 per epoch, its stopping epoch, the test metrics and `vs_popularity` (test NDCG@10 over the
popularity rule's). --quick: one fine-tuning epoch (checks the chain, learns nothing worth stating);
--finetune-epochs N: fine-tuning's cap, for trying settings in less time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from seminar_ray.rule_rankers import evaluate_rule

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("ndcg@10", "hr@10", "ndcg@5", "mrr", "auc")


def stage(name: str, args: list[str]) -> dict:
    """One job of the chain in a fresh process (`python jobs/NAME.py ARGS`), timed, with the load around it."""
    cmd = [sys.executable, f"jobs/{name}.py", *args]
    print("+", " ".join(cmd[1:]), flush=True)  # noqa: T201
    load0, t0 = os.getloadavg()[0], time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return {
        "command": " ".join(cmd[1:]),
        "seconds": round(time.time() - t0, 1),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a jobs/prepare_data.py output directory")
    p.add_argument("--work", type=Path, required=True, help="where the runs go (never the repository)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/out/chain_defaults_<data dir name>.json")
    p.add_argument("--quick", action="store_true", help="one fine-tuning epoch")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning's --epochs (default: the job's default)")
    p.add_argument("--eval-neg", type=int, help="every job's --eval-neg (default: the jobs' default)")
    p.add_argument("flags", nargs="*", help="extra flags for both training jobs, after --")
    args = p.parse_args()
    out = args.out or ROOT / "bench" / "out" / f"chain_defaults_{args.data.name}.json"
    data, runs = str(args.data.resolve()), args.work.resolve()
    epochs = 1 if args.quick else args.finetune_epochs
    neg = ["--eval-neg", str(args.eval_neg)] if args.eval_neg else []
    flags = [*args.flags, *neg]
    extra = [*flags, *(["--epochs", str(epochs)] if epochs else [])]
    t0 = time.time()
    stages = {
        "pretrain": stage("pretrain", ["--data", data, "--out", str(runs), *flags]),
        "finetune": stage("finetune", ["--data", data, "--out", str(runs), "--pretrained", str(runs / "psu"), *extra]),
        "evaluate": stage(
            "evaluate", ["--checkpoint", str(runs / "seminar"), "--split", "test", "--out", str(runs / "test"), *neg]
        ),
    }
    test = json.loads((runs / "test" / "metrics.json").read_text())
    popularity = evaluate_rule("popularity", data, "test", test["eval_seed"], test["eval_neg"])
    if popularity["candidates_digest"] != test["candidates_digest"]:
        raise RuntimeError("the popularity rule ranked other test candidates than the model: not comparable")
    summary = json.loads((runs / "seminar" / "metrics.json").read_text())
    result = {
        "data": data,
        "flags": args.flags,
        "finetune_epochs_flag": epochs,
        "quick": args.quick,
        "wall_s": round(time.time() - t0, 1),
        "stages": stages,
        "finetune_epochs": summary["epochs"],
        "finetune_best_epoch": summary["best_epoch"],
        "finetune_stopped_early": summary["stopped_early"],
        "pretrain_epochs": json.loads((runs / "psu" / "metrics.json").read_text())["epochs"],
        "valid_ndcg@10": [round(h["ndcg@10"], 4) for h in summary["history"]],
        "test": {k: test[k] for k in KEYS},
        "popularity_test": {k: popularity[k] for k in KEYS},
        "vs_popularity": test["ndcg@10"] / popularity["ndcg@10"],
        "eval_neg": test["eval_neg"],
        "candidates_digest": test["candidates_digest"],
        "cpus": os.cpu_count(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
