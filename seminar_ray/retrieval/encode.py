"""Building the retrieval index from a trained SEMINAR with Ray Data (paper §3.3.3; docs/design.md, Retrieval).

Codebooks and the key sketch are trained on the driver; every item and query is encoded in parallel by a Ray Data
actor pool (`EncodeBatch`), rows kept in id order; the artefact is written whole by `PQIndex.save`.
`build_index` (index.py) is the same index built in-process, for tests and benchmarks.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from seminar_ray import storage
from seminar_ray.retrieval.index import CHANNEL_PARTS, FOLDED_PARTS, ITEM_CHANNELS, PQIndex
from seminar_ray.retrieval.quantizer import PQCodec
from seminar_ray.retrieval.sketch import KeySketch
from seminar_ray.retrieval.tables import GSUTables

ENCODE_CPUS = 0.25  # per encoding actor: fractional, so a 2-core machine runs several


class EncodeBatch:
    """A Ray Data callable: one entity's parts side by side in a row ([n, P·d]) → each part's codes."""

    def __init__(self, centroids: dict[str, np.ndarray]):
        self.codecs = {part: PQCodec.from_centroids(c) for part, c in centroids.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack(list(batch["data"]))
        d = x.shape[1] // len(self.codecs)
        return {part: codec.encode(x[:, i * d : (i + 1) * d]) for i, (part, codec) in enumerate(self.codecs.items())}


def part_vectors(gsu: GSUTables) -> dict[str, np.ndarray]:
    """Every index part's vectors, rows indexed by entity id: T, I, A and Q per channel, and the folded ones."""
    parts = {p: gsu.item_channels[:, j, :] for j, p in enumerate(ITEM_CHANNELS)}
    parts["query_Q"] = gsu.query_channel
    parts["item_folded"], parts["query_folded"] = gsu.item_folded(), gsu.query_folded()
    return parts


def encode_with_ray(
    vectors: dict[str, np.ndarray], codecs: dict[str, PQCodec], batch_size: int, actors: int
) -> dict[str, np.ndarray]:
    """Codes of parts over the same entities (rows aligned) in one Ray Data pass, rows kept in id order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    parts = list(vectors)
    x = np.concatenate([np.asarray(vectors[p], dtype=np.float32) for p in parts], axis=1)
    blocks = np.array_split(x, max(1, min(actors, len(x))))  # one block per actor, or the pool idles
    ds = ray.data.from_numpy(blocks).map_batches(
        EncodeBatch,
        fn_constructor_args=({p: codecs[p].centroids for p in parts},),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=ENCODE_CPUS,
        compute=ray.data.ActorPoolStrategy(size=actors),
    )
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    codes: dict[str, np.ndarray] = {
        p: np.concatenate([b[p] for b in batches]).astype(codecs[p].code_dtype, copy=False) for p in parts
    }
    for p in parts:
        if codes[p].shape != (len(x), codecs[p].n_sub):
            raise RuntimeError(
                f"Ray Data returned {p} codes of shape {codes[p].shape}, expected {(len(x), codecs[p].n_sub)}"
            )
    return codes


def build_with_ray(
    gsu: GSUTables,
    version: str,
    n_sub: int,
    n_centroids: int,
    folded_n_sub: int,
    folded_n_centroids: int,
    sketch_dim: int = 32,
    batch_size: int = 65536,
    actors: int = 4,
) -> PQIndex:
    """Codebooks and the key sketch (one projection of the folded tables) on the driver; PQ codes via Ray Data,
    one pass per entity table (items: T, I, A, folded; queries: Q, folded)."""
    vectors = part_vectors(gsu)
    sizes = {p: (n_sub, n_centroids) for p in CHANNEL_PARTS}
    sizes |= {p: (folded_n_sub, folded_n_centroids) for p in FOLDED_PARTS}
    codecs = {part: PQCodec.fit(vectors[part][1:], ns, nc) for part, (ns, nc) in sizes.items()}
    codes: dict[str, np.ndarray] = {}
    for entity in ("item", "query"):  # one pass per entity table
        group = {p: vectors[p] for p in sizes if p.startswith(entity)}
        codes |= encode_with_ray(group, codecs, batch_size, actors)
    sketch = KeySketch.fit(vectors["query_folded"], vectors["item_folded"], min(sketch_dim, gsu.dim))
    return PQIndex(
        version=version,
        codecs=codecs,
        codes=codes,
        query_gamma=float(gsu.query_gamma),
        item_gamma=gsu.item_gamma.astype(np.float32),
        query_exact=vectors["query_folded"].astype(np.float16),
        item_exact=vectors["item_folded"].astype(np.float16),
        sketch=sketch,
    )


def save_index(index: PQIndex, out: str | Path) -> str:
    """Save whole in place; for a shared URI, save to a local temporary directory and upload it."""
    if not storage.is_uri(out):
        return str(index.save(out))
    with tempfile.TemporaryDirectory(prefix="index-") as tmp:
        storage.copy_dir(index.save(Path(tmp) / "index"), out)
    return str(out)


def fit_n_sub(dim: int, requested: int, flag: str) -> int:
    """The largest sub-vector count ≤ requested that divides dim (a d = 16 model cannot take 32 sub-vectors)."""
    n = max(k for k in range(1, min(requested, dim) + 1) if dim % k == 0)
    if n != requested:
        warnings.warn(f"{flag} {requested} does not divide the model's d = {dim}: using {n}", stacklevel=2)
    return n
