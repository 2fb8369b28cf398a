"""Amazon Video Games end to end against SASRec's published figure: SEMINAR, its no-pretraining ablation, DIN, SIM,
TWIN and popularity, ids only (`--queries none`), each test target ranked against 100 sampled negatives as in Kang &
McAuley (2018, Table III), whose SASRec row the table carries, labelled as published.

    python -m bench.compare_games --input Video.txt [--quick] [--seeds 2] [--work runs/games] [--set KEY=VALUE ...]

Video.txt is the "Games" file of the SASRec repositories (kang205/SASRec and pmixer/SASRec.pytorch, data/Video.txt):
one `user_id item_id` line per action in time order, 31,013 users, 23,715 items, 287,107 actions. The bench reads
it with jobs/prepare_data.py --source sasrec-txt and runs jobs/compare.py --eval-neg 100 (resumable: run the same
command again to go on). The config is the paper's rule for Amazon (§4.1: L = 100, K = 50). Writes
bench/out/compare_games.{md,json} (--quick: compare_games_quick.*) with the table, the load average and the wall time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.real_tables import ROOT, Timer, compare, parse, run, table_parser, write

EVAL_NEG = 100  # SASRec's protocol: the test item against 100 items the user never interacted with
# Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018, Table III, Amazon Games
PUBLISHED_ROW = "SASRec (published: Kang & McAuley 2018, Table III)"
PUBLISHED = {"ndcg@10": 0.5360, "hr@10": 0.7410}


def with_published_row(text: str) -> str:
    """Insert SASRec's published row under Table 2's header; the columns this run has and the paper does not are
    left empty."""
    head, sep, rest = text.partition("### Table 2")
    if not sep:
        return text
    lines = rest.split("\n")
    header = next(i for i, line in enumerate(lines) if line.startswith("method |"))
    columns = [c.strip() for c in lines[header].split("|")][1:]
    cells = [f"{PUBLISHED[c]:.4f}" if c in PUBLISHED else "" for c in columns]
    lines.insert(header + 2, " | ".join([PUBLISHED_ROW, *cells]))
    return head + sep + "\n".join(lines)


def against_published(result: dict) -> str:
    """The issue's target in one line: SEMINAR's test NDCG@10 against SASRec's published figure."""
    if "SEMINAR" not in result["aggregate"]:
        return ""
    mean, std = result["aggregate"]["SEMINAR"]["ndcg@10"]
    side = "at or above" if mean >= PUBLISHED["ndcg@10"] else "below"
    return f"- SEMINAR {mean:.4f} ±{std:.4f} is {side} SASRec's published {PUBLISHED['ndcg@10']:.4f} NDCG@10\n"


def main() -> int:
    p = table_parser(__doc__ or "", ROOT / "runs" / "games")
    p.add_argument("--input", type=Path, required=True, help="SASRec's Video.txt (`user_id item_id` per line)")
    args = parse(p)
    if not args.input.is_file():
        p.error(f"--input {args.input}: no such file (SASRec's data/Video.txt)")
    out = args.out or ROOT / "bench" / "out" / ("compare_games_quick" if args.quick else "compare_games")
    timer = Timer()
    data, runs = args.work / "data-none", args.work / ("compare-none-quick" if args.quick else "compare-none")
    if not (data / "meta.json").exists():
        run("-m", "jobs.prepare_data", "--source", "sasrec-txt", "--input", str(args.input), "--out", str(data))
    result, text = compare(args, data, runs, "--eval-neg", str(EVAL_NEG))
    title = f"Amazon Video Games (SASRec's Video.txt), {result['seeds']} seed(s), {EVAL_NEG} negatives per target"
    write(
        out,
        title,
        with_published_row(text),
        args,
        timer,
        {"published": {"method": PUBLISHED_ROW, **PUBLISHED}, "none": result},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
