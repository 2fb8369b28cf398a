"""Build the PQ retrieval index from a fine-tuned SEMINAR checkpoint (paper §3.3.3; docs/design.md, Retrieval).

Codebooks are trained on the driver; every item and query is encoded in parallel with Ray Data
(seminar_ray.retrieval.encode); the artefact is written whole or not at all.
Plain `python jobs/build_index.py ...` starts an embedded local Ray.
"""

from __future__ import annotations

import argparse
import sys

from seminar_ray.retrieval.encode import ENCODE_CPUS, index_checkpoint
from seminar_ray.runtime import init_ray, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="checkpoint or run directory of a fine-tuned SEMINAR")
    ap.add_argument("--data", required=True, help="dataset directory (entity tables) the model was trained on")
    ap.add_argument("--out", required=True, help="index directory to write: local, NFS or a shared URI")
    ap.add_argument("--n-sub", type=int, default=8)
    ap.add_argument("--n-centroids", type=int, default=256)
    ap.add_argument("--folded-n-sub", type=int, default=32)
    ap.add_argument("--folded-n-centroids", type=int, default=16)
    ap.add_argument("--sketch-dim", type=int, default=32, help="int8 key-sketch dims of the serving shortlist (≤ d)")
    ap.add_argument("--num-cpus", type=float, default=4, help="embedded Ray's logical CPUs when not in a cluster")
    args = ap.parse_args(argv)
    init_ray(num_cpus=int(args.num_cpus))
    index, out = index_checkpoint(
        args.checkpoint,
        args.data,
        args.out,
        args.n_sub,
        args.n_centroids,
        args.folded_n_sub,
        args.folded_n_centroids,
        args.sketch_dim,
        actors=max(1, int(args.num_cpus / ENCODE_CPUS) // 4),
    )
    print(f"index {index.version}: {index.num_items} items, {index.num_queries} queries, dim {index.dim} → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
