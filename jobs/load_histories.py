"""Load a dataset's base histories (sequences.parquet) into the Redis history store, pipelined in transactions.

    python -m jobs.load_histories --data runs/demo/data --store redis://127.0.0.1:6379/0 [--batch-users 512]
    ray job submit --working-dir . -- python -m jobs.load_histories --data DATA --store redis://HEAD:6379/0

Resumable (a rerun after a crash continues at the first batch not committed) and idempotent (a finished table is not
loaded again; appended events are never touched). Run it before serving with `store: redis://...`
(seminar_ray/serving/redis_store.py, docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from seminar_ray.errors import InputError
from seminar_ray.runtime import run_cli, setup_logging
from seminar_ray.serving.history import REDIS_SCHEMES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset directory written by jobs/prepare_data.py")
    ap.add_argument("--store", required=True, help="redis://host:port/db of a server with appendfsync always")
    ap.add_argument("--batch-users", type=int, default=512, help="users per pipelined transaction")
    args = ap.parse_args(argv)
    if not args.store.startswith(REDIS_SCHEMES):
        raise InputError(f"--store {args.store!r}: expected a redis:// URL (the log store reads the parquet itself)")
    setup_logging()
    from seminar_ray.serving.redis_store import load_base

    report = load_base(args.store, args.data, batch_users=args.batch_users)
    print(json.dumps(asdict(report), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
