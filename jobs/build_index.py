"""Build the PQ retrieval index from a fine-tuned SEMINAR checkpoint (paper §3.3.3; docs/design.md, Retrieval).

Codebooks are trained on the driver; every item and query is encoded in parallel with Ray Data
(seminar_ray.retrieval.encode); the artefact is written whole or not at all.
Plain `python jobs/build_index.py ...` starts an embedded local Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import cast

from seminar_ray.data.entities import EntityTables
from seminar_ray.models import SeminarCTR, export_gsu_tables, load_checkpoint
from seminar_ray.retrieval.encode import ENCODE_CPUS, build_with_ray, fit_n_sub, save_index
from seminar_ray.retrieval.index import PQIndex
from seminar_ray.runs import resolve_checkpoint
from seminar_ray.runtime import init_ray, run_cli

log = logging.getLogger(__name__)


def index_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    n_sub: int = 8,
    n_centroids: int = 256,
    folded_n_sub: int = 32,
    folded_n_centroids: int = 16,
    sketch_dim: int = 32,
    actors: int = 4,
) -> tuple[PQIndex, str]:
    """A fine-tuned SEMINAR checkpoint (or run directory: its selected checkpoint) → the index written at `out`.

    Needs a running Ray (`seminar_ray.runtime.init_ray`). Returns the index and where it was written.
    """
    tables = EntityTables.load(data)
    resolved = resolve_checkpoint(checkpoint)
    model, _, _ = load_checkpoint(resolved, tables, kind="seminar")
    gsu = export_gsu_tables(cast(SeminarCTR, model))
    n_sub = fit_n_sub(gsu.dim, n_sub, "--n-sub")
    folded_n_sub = fit_n_sub(gsu.dim, folded_n_sub, "--folded-n-sub")
    version = f"{Path(str(resolved)).name}-pq{n_sub}x{n_centroids}"
    index = build_with_ray(
        gsu, version, n_sub, n_centroids, folded_n_sub, folded_n_centroids, sketch_dim, actors=actors
    )
    written = save_index(index, out)
    log.info(
        "index %s: %d items, %d queries, dim %d → %s",
        index.version,
        index.num_items,
        index.num_queries,
        index.dim,
        written,
    )
    return index, written


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
