"""MovieLens-100K end to end: SEMINAR, its no-pretraining ablation, DIN, SIM, TWIN and the rules, under
--queries none (pure sequential recommendation) and --queries derived (each item's query from its leaf genre).

    python -m bench.compare_ml100k [--quick] [--seeds 2] [--work runs/ml100k] [--set KEY=VALUE ...]

The data is the RecBole atomic copy of MovieLens-100K that the `recbole` wheel on PyPI ships under
recbole/dataset_example/ml-100k: the wheel is downloaded with pip into WORK (nothing of it is committed), then
jobs/prepare_data.py and jobs/compare.py run once per query mode. Writes bench/out/compare_ml100k.{md,json}
(--quick: compare_ml100k_quick.*) with the tables, the load average and the wall time.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from bench.real_tables import ROOT, Timer, compare, parse, run, table_parser, write

WHEEL = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/"


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


def main() -> int:
    p = table_parser(__doc__ or "", ROOT / "runs" / "ml100k")
    p.add_argument("--modes", default="none,derived")
    args = parse(p)
    out = args.out or ROOT / "bench" / "out" / ("compare_ml100k_quick" if args.quick else "compare_ml100k")
    timer = Timer()
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
        results[mode], text = compare(args, data, runs)
        texts.append(f"## --queries {mode}\n\n{text}")
    seeds = {mode: r["seeds"] for mode, r in results.items()}
    title = f"MovieLens-100K (RecBole atomic files from {WHEEL}), seeds per query mode {seeds}"
    write(out, title, "\n".join(texts), args, timer, {"modes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
