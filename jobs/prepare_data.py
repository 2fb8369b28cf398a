"""Raw logs → items/queries/sequences Parquet (docs/design.md, Data model).

python jobs/prepare_data.py --source synthetic --scale small --out data/small
python jobs/prepare_data.py --source recbole --input ml-100k/ --out data/ml100k
python jobs/prepare_data.py --source recbole --input ml-100k/ --out data/ml100k-none --queries none
python jobs/prepare_data.py --source sasrec-txt --input Video.txt --out data/games
ray job submit --working-dir . -- python jobs/prepare_data.py --source synthetic --out /shared/data/small

Sources: synthetic (generated); recbole (a directory with one .inter and optionally .item); kuaisar (its CSV
directory); amazon (a reviews file and a meta_* file, 2018 JSON lines); sasrec-txt (one `user_id item_id` file,
file order = time order, ids only; the SASRec repositories kang205/SASRec and pmixer/SASRec.pytorch ship
Video.txt, Beauty.txt, Steam.txt and ml-1m.txt in their data/ directories).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from seminar_ray.data.queries import QUERY_MODES, apply_mode, resolve_mode
from seminar_ray.data.schema import DatasetMeta, DatasetTables
from seminar_ray.errors import InputError
from seminar_ray.runtime import init_ray, run_cli, setup_logging

log = logging.getLogger(__name__)
READERS = {"recbole": "recbole", "kuaisar": "kuaisar", "amazon": "amazon", "sasrec-txt": "sasrec_txt"}  # → module
SOURCES = ("synthetic", *READERS)
# users with fewer behaviours are dropped unless --min-interactions says otherwise; sasrec-txt files come filtered
MIN_INTERACTIONS = {"kuaisar": 4, "amazon": 5, "sasrec-txt": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=SOURCES, required=True)
    p.add_argument("--input", type=Path, help="input file or directory (not for synthetic)")
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    p.add_argument("--max-len", type=int, default=2000, help="keep each user's most recent behaviours")
    p.add_argument("--min-interactions", type=int, default=None, help="drop users with fewer (default per source)")
    p.add_argument("--scale", default="small", help="synthetic preset: tiny, small, medium, long, large")
    p.add_argument("--users", type=int, help="synthetic: override the number of users")
    p.add_argument("--items", type=int, help="synthetic: override the number of items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--queries",
        choices=QUERY_MODES,
        default=None,
        help="source: real search logs (synthetic, kuaisar); derived: each item's query from its own "
        "description or category (recbole, amazon); none: every behaviour gets the empty query "
        "(pure sequential recommendation; the only mode of sasrec-txt). Default: the source's own kind",
    )
    return p.parse_args(argv)


def write_synthetic(args: argparse.Namespace, mode: str) -> Path:
    """The synthetic source, generated and written in chunks of users (never every behaviour in memory at once)."""
    from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir

    overrides = {k: v for k, v in (("num_users", args.users), ("num_items", args.items)) if v}
    cfg = SyntheticConfig.preset(args.scale, seed=args.seed, **overrides)
    cfg = replace(cfg, max_len=min(cfg.max_len, args.max_len), min_len=min(cfg.min_len, args.max_len))
    return generate_to_dir(cfg, args.out, progress=True, mode=mode)


def read_source(args: argparse.Namespace) -> DatasetTables:
    if args.input is None:
        raise InputError(f"--input is required for --source {args.source}")
    if not args.input.exists():
        raise FileNotFoundError(f"{args.input}: no such file or directory")
    import importlib

    reader = importlib.import_module(f"seminar_ray.data.readers.{READERS[args.source]}")
    min_inter = args.min_interactions if args.min_interactions is not None else MIN_INTERACTIONS.get(args.source, 3)
    return reader.read(args.input, min_interactions=min_inter, max_len=args.max_len)


def _row_stats(batch):
    """Per user: sequence length and number of search behaviours (non-empty query)."""
    import numpy as np

    queries = batch["query_ids"].combine_chunks()
    offsets = queries.offsets.to_numpy()
    is_search = np.concatenate([(queries.values.to_numpy()[offsets[0] : offsets[-1]] > 0).astype(np.int64), [0]])
    return {
        "n": np.diff(offsets),
        "search": np.add.reduceat(is_search, offsets[:-1] - offsets[0]) * (np.diff(offsets) > 0),
    }


def summarize(out: Path) -> dict:
    """Users, items, queries, behaviours and sequence lengths, computed with Ray Data over the written table."""
    from seminar_ray.data.pipeline import MAP_CONCURRENCY, MAP_CPUS, map_compute, read_sequences

    stats = (
        read_sequences(out, min_blocks=MAP_CONCURRENCY)
        .map_batches(_row_stats, batch_format="pyarrow", num_cpus=MAP_CPUS, compute=map_compute())
        .to_pandas()
    )
    meta = DatasetMeta.load(out)
    n = stats["n"].to_numpy()
    return {
        "users": int(len(n)),
        "items": meta.num_items,
        "queries": meta.num_queries,
        "query_mode": meta.extra.get("queries"),
        "behaviours": int(n.sum()),
        "search_share": round(float(stats["search"].sum() / max(1, n.sum())), 4),
        "mean_len": round(float(n.mean()), 1),
        "max_len": int(n.max()),
        "out": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    t0 = time.time()
    mode = resolve_mode(args.source, args.queries)  # before reading: a wrong mode costs nothing
    log.info("reading %s%s", args.source, f" from {args.input}" if args.input else f" (preset {args.scale})")
    if args.source == "synthetic":
        out = write_synthetic(args, mode)
    else:
        tables = apply_mode(read_source(args), mode)
        log.info("validating and writing %s", args.out)
        out = tables.write(args.out)
    init_ray()
    summary = summarize(out)
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
