"""Build the PQ retrieval index from a fine-tuned SEMINAR checkpoint (paper §3.3.3; docs/design.md, Retrieval).

Codebooks are trained on the driver; every item and query is encoded in parallel with Ray Data
(map_batches, fractional CPUs); the artefact is written atomically (tmp dir + rename) by PQIndex.save.
Plain `python jobs/build_index.py ...` starts an embedded local Ray.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seminar_ray import storage  # noqa: E402
from seminar_ray.retrieval.index import CHANNEL_PARTS, FOLDED_PARTS, ITEM_CHANNELS, PQIndex  # noqa: E402
from seminar_ray.retrieval.quantizer import PQCodec  # noqa: E402
from seminar_ray.retrieval.sketch import KeySketch  # noqa: E402
from seminar_ray.retrieval.tables import GSUTables  # noqa: E402
from seminar_ray.runtime import init_ray, run_cli  # noqa: E402


class EncodeBatch:
    """A Ray Data callable: one entity's parts side by side in a row ([n, P·d]) → each part's codes."""

    def __init__(self, centroids: dict[str, np.ndarray]):
        self.codecs = {part: PQCodec.from_centroids(c) for part, c in centroids.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack(batch["data"])
        d = x.shape[1] // len(self.codecs)
        return {part: codec.encode(x[:, i * d:(i + 1) * d]) for i, (part, codec) in enumerate(self.codecs.items())}


def part_vectors(gsu: GSUTables) -> dict[str, np.ndarray]:
    parts = {p: gsu.item_channels[:, j, :] for j, p in enumerate(ITEM_CHANNELS)}
    parts["query_Q"] = gsu.query_channel
    parts["item_folded"], parts["query_folded"] = gsu.item_folded(), gsu.query_folded()
    return parts


def encode_with_ray(vectors: dict[str, np.ndarray], codecs: dict[str, PQCodec], batch_size: int,
                    concurrency: int) -> dict[str, np.ndarray]:
    """Codes of parts over the same entities (rows aligned) in one Ray Data pass, rows kept in id order."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    parts = list(vectors)
    x = np.concatenate([np.asarray(vectors[p], dtype=np.float32) for p in parts], axis=1)
    ds = ray.data.from_numpy(x).map_batches(
        EncodeBatch, fn_constructor_args=({p: codecs[p].centroids for p in parts},), batch_size=batch_size,
        batch_format="numpy", num_cpus=0.25, concurrency=concurrency)
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    codes = {p: np.concatenate([b[p] for b in batches]).astype(codecs[p].code_dtype, copy=False) for p in parts}
    for p in parts:
        if codes[p].shape != (len(x), codecs[p].n_sub):
            raise RuntimeError(f"Ray Data returned {p} codes of shape {codes[p].shape}, expected "
                               f"{(len(x), codecs[p].n_sub)}")
    return codes


def build(gsu: GSUTables, version: str, n_sub: int, n_centroids: int, folded_n_sub: int, folded_n_centroids: int,
          sketch_dim: int = 32, batch_size: int = 65536, concurrency: int = 4) -> PQIndex:
    """Codebooks and the key sketch (one projection of the folded tables) on the driver; PQ codes via Ray Data,
    one pass per entity table (items: T, I, A, folded; queries: Q, folded)."""
    vectors = part_vectors(gsu)
    sizes = {p: (n_sub, n_centroids) for p in CHANNEL_PARTS} | {p: (folded_n_sub, folded_n_centroids) for p in FOLDED_PARTS}
    codecs = {part: PQCodec.fit(vectors[part][1:], ns, nc) for part, (ns, nc) in sizes.items()}
    codes = {}
    for entity in ("item", "query"):  # one pass per entity table
        group = {p: vectors[p] for p in sizes if p.startswith(entity)}
        codes |= encode_with_ray(group, codecs, batch_size, concurrency)
    sketch = KeySketch.fit(vectors["item_folded"], vectors["query_folded"], min(sketch_dim, gsu.dim))
    return PQIndex(version, codecs, codes, gsu.item_gamma.astype(np.float32), float(gsu.query_gamma),
                   vectors["item_folded"].astype(np.float16), vectors["query_folded"].astype(np.float16),
                   sketch=sketch)


def _save(index: PQIndex, out: str) -> str:
    """Save atomically in place; for a shared URI, save to a local temp directory and upload it."""
    if not storage.is_uri(out):
        return str(index.save(out))
    with tempfile.TemporaryDirectory(prefix="index-") as tmp:
        storage.copy_dir(index.save(Path(tmp) / "index"), out)
    return out


def fit_n_sub(dim: int, requested: int, flag: str) -> int:
    """The largest sub-vector count ≤ requested that divides dim (a d = 16 model cannot take 32 sub-vectors)."""
    n = max(k for k in range(1, min(requested, dim) + 1) if dim % k == 0)
    if n != requested:
        warnings.warn(f"{flag} {requested} does not divide the model's d = {dim}: using {n}", stacklevel=2)
    return n


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

    from seminar_ray.data.entities import EntityTables
    from seminar_ray.models import export_gsu_tables, load_checkpoint
    from seminar_ray.train.checkpoints import resolve_checkpoint

    tables = EntityTables.load(args.data)
    checkpoint = resolve_checkpoint(args.checkpoint)  # a run directory resolves to its best checkpoint
    model, _, _ = load_checkpoint(checkpoint, tables)
    gsu = export_gsu_tables(model)
    n_sub = fit_n_sub(gsu.dim, args.n_sub, "--n-sub")
    folded_n_sub = fit_n_sub(gsu.dim, args.folded_n_sub, "--folded-n-sub")
    init_ray(num_cpus=int(args.num_cpus))
    version = f"{Path(str(checkpoint)).name}-pq{n_sub}x{args.n_centroids}"
    index = build(gsu, version, n_sub, args.n_centroids, folded_n_sub, args.folded_n_centroids,
                  args.sketch_dim, concurrency=max(1, int(args.num_cpus / 0.25) // 4))
    out = _save(index, args.out)
    print(f"index {index.version}: {index.num_items} items, {index.num_queries} queries, dim {index.dim} → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
