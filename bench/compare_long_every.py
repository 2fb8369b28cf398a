"""L = 2,000 trained on every position: the `long` synthetic preset's table (SEMINAR, its ablations and every
baseline) with each model trained on every training position of each user under the stopping rule, instead of the
8 sampled targets per user and 3 epochs of bench/out/compare_long.md.

    python -m bench.compare_long_every [--quick] [--users 200] [--seeds 2] [--work runs/long-every]

The preset's 2,000 users give about 3 million training targets an epoch; on 2 CPU cores that is days a seed, so the
table runs on fewer users (--users, default 200) and shrinks the item catalogue with them (--items, default 25 a user,
the preset's ratio) so that popularity, the floor every learned row must clear, stays near the 2,000-user table's
instead of rising as items no one bought fill the sampled negatives. The config is the paper's (configs/
model_paper.yaml: L = 2,000, K = 200, d = 64, the sum of the PSU's losses). Resumable: jobs/compare.py keeps each
finished (seed, row) in WORK/compare/compare_partial.json, and several processes may share it (--variants a subset
each). Writes bench/out/compare_long_every.{md,json} (--quick: 40 users, compare_long_every_quick.*).
"""

from __future__ import annotations

import sys

from bench.real_tables import ROOT, Timer, compare, parse, run, table_parser, write

ITEMS_PER_USER = 25  # the `long` preset: 50,000 items for 2,000 users
QUICK_USERS = 40
ROWS = "SEMINAR,w/o pretraining,w. align only,w. next-pair only,w. q-i relevance only,DIN,SIM,QIN,ETA,TWIN"


def main() -> int:
    p = table_parser(__doc__ or "", ROOT / "runs" / "long-every")
    p.add_argument("--users", type=int, default=200, help="users of the `long` preset (the preset has 2,000)")
    p.add_argument("--items", type=int, default=None, help=f"items (default {ITEMS_PER_USER} a user)")
    p.set_defaults(config=ROOT / "configs" / "model_paper.yaml", set=[], variants=ROWS)
    args = parse(p)
    if args.quick:
        args.users = QUICK_USERS
    items = args.items or ITEMS_PER_USER * args.users
    out = args.out or ROOT / "bench" / "out" / ("compare_long_every_quick" if args.quick else "compare_long_every")
    timer = Timer()
    tag = f"u{args.users}-i{items}"
    data, runs = args.work / f"data-{tag}", args.work / f"compare-{tag}{'-quick' if args.quick else ''}"
    if not (data / "meta.json").exists():
        synthetic = ["--source", "synthetic", "--scale", "long", "--users", str(args.users), "--items", str(items)]
        run("-m", "jobs.prepare_data", *synthetic, "--out", str(data))
    result, text = compare(args, data, runs)
    title = f"L = 2,000 (`long` preset, {args.users} users, {items} items), every position, {result['seeds']} seed(s)"
    write(out, title, text, args, timer, {"users": args.users, "items": items, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
