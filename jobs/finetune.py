"""Fine-tune the CTR model (paper §3.3.2), or train a baseline, on Ray Train.

python jobs/finetune.py --data data/small --out runs --pretrained runs/psu
python jobs/finetune.py --data data/small --out runs --model twin
ray job submit --working-dir . -- python jobs/finetune.py --data /shared/data --out /shared/runs --pretrained
/shared/runs/psu
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import add_train_flags, job_from_args, print_summary
from seminar_ray.runtime import init_ray, run_cli, setup_logging
from seminar_ray.train.job import run_training

CTR_MODELS = ("seminar", "sim", "eta", "twin", "qin", "din")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p, CTR_MODELS)
    p.add_argument("--pretrained", help="PSU checkpoint or run directory (seminar only); omit to train from scratch")
    args = p.parse_args(argv)
    job = job_from_args(args, args.model, pretrained=args.pretrained)
    init_ray(quiet=False)
    print_summary(run_training(job))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
