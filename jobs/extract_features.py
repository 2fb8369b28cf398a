"""Fill text_emb / image_emb of a prepared dataset with open_clip features on a Ray Data actor pool.

    python jobs/extract_features.py --data data/amazon [--pretrained openai|PATH|none] [--actors 2] [--batch-size 16]
    [--use-gpu]
    ray job submit --working-dir . -- python jobs/extract_features.py --data /shared/data/amazon --use-gpu

Embedded local Ray unless --address or $RAY_ADDRESS names a cluster. Prints a JSON summary: items with
text/image features, missing counts by reason (no_text, no_image, unreadable, fetch_failed), items/s.
Bad input exits 2 with a one-line error and leaves the dataset untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seminar_ray.data.features import DEFAULT_MODEL, FeatureConfig, extract_features
from seminar_ray.data.schema import DatasetMeta
from seminar_ray.errors import InputError
from seminar_ray.runtime import init_ray, run_cli, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="dataset directory written by jobs/prepare_data.py")
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name (default ViT-B-32, as the paper)")
    p.add_argument("--pretrained", default="openai", help="open_clip tag, a local checkpoint file, or 'none' (random)")
    p.add_argument("--actors", type=int, default=2, help="encoder actors in the pool")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs reserved per actor (fractional)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.actors < 1 or args.batch_size < 1:
        raise InputError("--actors and --batch-size must be >= 1")
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    cfg = FeatureConfig(
        model=args.model,
        pretrained=pretrained,
        actors=args.actors,
        batch_size=args.batch_size,
        use_gpu=args.use_gpu,
        num_cpus=args.num_cpus,
    )
    DatasetMeta.load(args.data)  # fail on a wrong --data before starting Ray
    init_ray(args.address)
    summary = extract_features(args.data, cfg)
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
