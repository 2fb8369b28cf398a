"""Pretrain the PSU (paper §3.3.1) on Ray Train.

python jobs/pretrain.py --data data/small --out runs --epochs 2
ray job submit --working-dir . -- python jobs/pretrain.py --data /shared/data --out /shared/runs --num-workers 2
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import add_train_flags, job_from_args, print_summary
from seminar_ray.runtime import init_ray, run_cli, setup_logging
from seminar_ray.train.job import run_training


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p)
    args = p.parse_args(argv)
    job = job_from_args(args, "psu")
    job.run_name = args.run_name or "psu"
    init_ray(quiet=False)
    print_summary(run_training(job))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
