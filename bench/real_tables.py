"""What the full-budget tables on real data share (bench/compare_ml100k.py, bench/compare_games.py): one set of
arguments, one jobs/compare.py command per dataset, one writer of the Markdown and JSON with the wall time and the
load average beside them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from seminar_ray.runs import PATIENCE

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = "SEMINAR,w/o pretraining,DIN,SIM,TWIN"
TABLE_SET = ["d=64", "heads=4", "recent_len=1"]


def table_parser(doc: str, work: Path) -> argparse.ArgumentParser:
    """The arguments every table takes; a bench adds its dataset's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=work, help="prepared data and runs (resumable)")
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
    p.add_argument("--variants", default=VARIANTS)
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 1 pretraining epoch, SEMINAR and DIN")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the seeds that WORK's compare_partial.json files complete",
    )
    p.add_argument("--out", type=Path, default=None)
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.pretrain_epochs, args.variants = 1, 2, 1, "SEMINAR,DIN"
    return args


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def compare(args: argparse.Namespace, data: Path, runs: Path, *extra: str) -> tuple[dict, str]:
    """jobs/compare.py on DATA into RUNS with the table's settings: every position, every validation user.
    Returns compare.json and compare.md without its title."""
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
        *extra,
        *(["--set", *args.set] if args.set else []),
        *(["--report-only"] if args.report_only else []),
    )
    return json.loads((runs / "compare.json").read_text()), (runs / "compare.md").read_text().split("\n", 2)[2]


class Timer:
    """Wall time and the load average at the start and the end, for the header beside the figures."""

    def __init__(self) -> None:
        self.t0, self.load0 = time.time(), os.getloadavg()

    def record(self) -> dict:
        return {"seconds": time.time() - self.t0, "loadavg_start": self.load0, "loadavg_end": os.getloadavg()}


def write(out: Path, title: str, body: str, args: argparse.Namespace, timer: Timer, record: dict) -> None:
    """OUT.md (title, how it was run, body) and OUT.json (the settings, the timing and RECORD)."""
    t = timer.record()
    how = (
        "Tabulated from finished runs (--report-only).\n\n"
        if args.report_only
        else f"Wall time {t['seconds'] / 60:.0f} min; load average {t['loadavg_start'][0]:.1f} at start, "
        f"{t['loadavg_end'][0]:.1f} at end (2-core machine).\n\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"# {title}\n\n{how}{body}")
    settings = {k: getattr(args, k) for k in ("seeds", "epochs", "patience", "set", "pretrain_epochs")}
    out.with_suffix(".json").write_text(json.dumps({**t, **settings, **record}, indent=1))
    print(out.with_suffix(".md").read_text())
