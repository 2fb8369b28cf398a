"""MovieLens-100K end to end: SEMINAR, its no-pretraining ablation, DIN, SIM, TWIN and the rules, under
--queries none (pure sequential recommendation) and --queries derived (each item's query from its leaf genre).

    python -m bench.compare_ml100k [--quick] [--seeds 2] [--work runs/ml100k] [--set KEY=VALUE ...]

The data is the RecBole atomic copy of MovieLens-100K that the `recbole` wheel on PyPI ships under
recbole/dataset_example/ml-100k: the wheel is downloaded with pip into WORK (nothing of it is committed), then
jobs/prepare_data.py and jobs/compare.py run once per query mode. Writes bench/out/compare_ml100k.{md,json}
(--quick: compare_ml100k_quick.*) with the tables, the load average and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from seminar_ray.runs import PATIENCE

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/"
VARIANTS = "SEMINAR,w/o pretraining,DIN,SIM,TWIN"
TABLE_SET = ["d=64", "heads=4", "recent_len=1"]


def fetch_ml100k(work: Path) -> Path:
    """WORK/ml-100k/{ml-100k.inter, ml-100k.item} from the recbole wheel (downloaded once, no dependencies)."""
    out = work / "ml-100k"
    if (out / "ml-100k.inter").exists():
        return out
    wheels = work / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), WHEEL], check=True)
    wheel = next(wheels.glob("recbole-*.whl"))
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in ("ml-100k.inter", "ml-100k.item"):
            (out / name).write_bytes(z.read(MEMBER + name))
    return out


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "ml100k")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30, help="the cap of the stopping rule (jobs/compare.py)")
    p.add_argument(
        "--patience", type=int, default=PATIENCE, help="epochs without a better validation NDCG@10 before a stop"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "model_ml100k.yaml",
        help="model config (default: the small sizes with the paper's L = 100, K = 50 for short histories)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=TABLE_SET,
        metavar="KEY=VALUE",
        help="config overrides for every row (default: the paper's width and the last behaviour as the MLP's recent "
        "vector, chosen on validation; docs/results.md)",
    )
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--modes", default="none,derived")
    p.add_argument("--variants", default=VARIANTS)
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 1 pretraining epoch, SEMINAR and DIN")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the seeds each mode's WORK/compare-MODE/compare_partial.json completes",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.pretrain_epochs, args.variants = 1, 2, 1, "SEMINAR,DIN"
    out = args.out or ROOT / "bench" / "out" / ("compare_ml100k_quick" if args.quick else "compare_ml100k")
    t0, load0 = time.time(), os.getloadavg()
    raw = fetch_ml100k(args.work)
    results, texts = {}, []
    for mode in args.modes.split(","):
        data, runs = args.work / f"data-{mode}", args.work / f"compare-{mode}{'-quick' if args.quick else ''}"
        if not (data / "meta.json").exists():
            run(
                "-m",
                "jobs.prepare_data",
                "--source",
                "recbole",
                "--input",
                str(raw),
                "--out",
                str(data),
                "--queries",
                mode,
            )
        run(
            "-m",
            "jobs.compare",
            "--data",
            str(data),
            "--out",
            str(runs),
            "--seeds",
            str(args.seeds),
            "--epochs",
            str(args.epochs),
            "--patience",
            str(args.patience),
            "--pretrain-epochs",
            str(args.pretrain_epochs),
            "--samples-per-user",
            "0",
            "--eval-users",
            "0",
            "--config",
            str(args.config),
            "--variants",
            args.variants,
            *(["--set", *args.set] if args.set else []),
            *(["--report-only"] if args.report_only else []),
        )
        results[mode] = json.loads((runs / "compare.json").read_text())
        texts.append(f"## --queries {mode}\n\n" + (runs / "compare.md").read_text().split("\n", 2)[2])
    seconds = time.time() - t0
    load1 = os.getloadavg()
    seeds = {mode: r["seeds"] for mode, r in results.items()}
    header = f"# MovieLens-100K (RecBole atomic files from {WHEEL}), seeds per query mode {seeds}\n\n" + (
        "Tabulated from finished runs (--report-only).\n\n"
        if args.report_only
        else f"Wall time {seconds / 60:.0f} min; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end "
        f"(2-core machine).\n\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + "\n".join(texts))
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "seconds": seconds,
                "loadavg_start": load0,
                "loadavg_end": load1,
                "seeds": args.seeds,
                "epochs": args.epochs,
                "patience": args.patience,
                "set": args.set,
                "pretrain_epochs": args.pretrain_epochs,
                "modes": results,
            },
            indent=1,
        )
    )
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
