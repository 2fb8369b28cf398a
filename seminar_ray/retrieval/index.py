"""The retrieval index artefact: per-entity PQ codes, codebooks, fp16 exact tables and a version (docs/design.md,
Retrieval)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from seminar_ray import storage
from seminar_ray.retrieval.quantizer import DimensionMismatchError, PQCodec
from seminar_ray.retrieval.sketch import KeySketch
from seminar_ray.retrieval.tables import GSUTables

FORMAT_VERSION = 1
ITEM_CHANNELS = ("item_T", "item_I", "item_A")  # order of GSUTables.item_channels
CHANNEL_PARTS = (*ITEM_CHANNELS, "query_Q")  # the paper's per-channel form
FOLDED_PARTS = ("item_folded", "query_folded")  # docs/design.md, Retrieval: two look-ups per behaviour
SKETCH_ARRAYS = ("projection", "scale", "residual_cov", "query_codes", "item_codes")  # KeySketch fields


class UnknownIdError(KeyError):
    """An entity id outside the index's table."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_ids(kind: str, ids: np.ndarray, size: int) -> None:
    """Raise UnknownIdError naming the first id outside [0, size)."""
    bad = (ids < 0) | (ids >= size)
    if bad.any():
        raise UnknownIdError(
            f"unknown {kind} id {int(ids[bad][0])}: the {kind} table has {size} rows (ids 0..{size - 1})"
        )


@dataclass(kw_only=True)
class PQIndex:
    """Codebooks + codes [n, N_sub] per part + exact folded fp16 tables + per-entity γ (paper §3.3.3; docs/design.md,
    Retrieval).

    parts: "item_T", "item_I", "item_A", "query_Q" (per channel) and/or "item_folded", "query_folded".
    A behaviour (q, i) has key k = λ x^Q_q + Σ_j γ_ij x^(j)_i = query_exact[q] + item_exact[i]. Keyword-only: the
    query and item tables are arrays of one shape and dtype, so a swap would raise nothing.
    """

    version: str
    codecs: dict[str, PQCodec]
    codes: dict[str, np.ndarray]
    query_gamma: float
    item_gamma: np.ndarray  # float32 [N+1, 3]
    query_exact: np.ndarray  # float16 [Q+1, d], folded
    item_exact: np.ndarray  # float16 [N+1, d], folded
    extra: dict = field(default_factory=dict)
    sketch: KeySketch | None = None  # int8 key sketch for the serving shortlist (sketch.py)

    @property
    def dim(self) -> int:
        return int(self.item_exact.shape[1])

    @property
    def num_items(self) -> int:
        return int(self.item_exact.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.query_exact.shape[0])

    def has_form(self, form: str) -> bool:
        return all(p in self.codes for p in (FOLDED_PARTS if form == "folded" else CHANNEL_PARTS))

    def part_weight(self, part: str, ids: np.ndarray) -> np.ndarray | float:
        """γ of a part for the given entity ids (1 for folded parts)."""
        if part in ITEM_CHANNELS:
            return self.item_gamma[ids, ITEM_CHANNELS.index(part)]
        return self.query_gamma if part == "query_Q" else 1.0

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write .npy files + manifest.json atomically (tmp dir + rename); replaces an existing artefact."""
        out = Path(out_dir)
        with storage.staged_dir(out) as tmp:
            arrays = {"item_gamma": self.item_gamma, "item_exact": self.item_exact, "query_exact": self.query_exact}
            for part, codec in self.codecs.items():
                arrays[f"codebook_{part}"] = codec.centroids
                arrays[f"codes_{part}"] = self.codes[part]
            if self.sketch is not None:
                arrays |= {f"sketch_{name}": getattr(self.sketch, name) for name in SKETCH_ARRAYS}
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            manifest = {
                "format": FORMAT_VERSION,
                "version": self.version,
                "dim": self.dim,
                "query_gamma": self.query_gamma,
                "num_items": self.num_items,
                "num_queries": self.num_queries,
                "extra": self.extra,
                "parts": {
                    p: {
                        "n_sub": c.n_sub,
                        "n_centroids": c.n_centroids,
                        "nbits": c.nbits,
                        "codes_shape": list(self.codes[p].shape),
                    }
                    for p, c in self.codecs.items()
                },
                "sketch_dim": None if self.sketch is None else self.sketch.sketch_dim,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return out

    @classmethod
    def load(cls, index_dir: str | os.PathLike, mmap: bool = True) -> PQIndex:
        """Read an artefact written by save(); codes and tables are memory-mapped when mmap.

        `index_dir` may be a shared URI: it is mirrored into the node-local cache first (seminar_ray.storage)."""
        path = storage.local_dir(index_dir)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no index manifest at {manifest_path}")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"index format {manifest.get('format')} at {path} is not {FORMAT_VERSION}")
        mode: Literal["r"] | None = "r" if mmap else None

        def arr(name: str) -> np.ndarray:
            return np.load(path / f"{name}.npy", mmap_mode=mode)

        codecs, codes = {}, {}
        for part, info in manifest["parts"].items():
            codecs[part] = PQCodec.from_centroids(np.asarray(arr(f"codebook_{part}")))
            codes[part] = arr(f"codes_{part}")
            if list(codes[part].shape) != info["codes_shape"] or codecs[part].n_centroids != info["n_centroids"]:
                raise ValueError(f"index part {part} at {path} does not match its manifest")
        sketch = None
        if manifest.get("sketch_dim") is not None:
            sketch = KeySketch(**{name: arr(f"sketch_{name}") for name in SKETCH_ARRAYS})
            if sketch.sketch_dim != manifest["sketch_dim"] or sketch.item_codes.shape[0] != manifest["num_items"]:
                raise ValueError(f"index sketch at {path} does not match its manifest")
        index = cls(
            version=manifest["version"],
            codecs=codecs,
            codes=codes,
            query_gamma=float(manifest["query_gamma"]),
            item_gamma=arr("item_gamma"),
            query_exact=arr("query_exact"),
            item_exact=arr("item_exact"),
            extra=manifest.get("extra", {}),
            sketch=sketch,
        )
        if index.dim != manifest["dim"]:
            raise DimensionMismatchError(f"index tables have dim {index.dim}, manifest says {manifest['dim']}")
        return index


def build_index(
    tables: GSUTables,
    version: str,
    n_sub: int = 8,
    n_centroids: int = 256,
    forms: tuple[str, ...] = ("folded", "channel"),
    max_train: int = 65536,
    seed: int = 0,
    folded_n_sub: int | None = None,
    folded_n_centroids: int | None = None,
    sketch_dim: int | None = 32,
    channel_parts: PQIndex | None = None,
) -> PQIndex:
    """Train one codebook per part on the entities (row 0 excluded) and encode every entity once (docs/design.md,
    Retrieval).

    sketch_dim: the int8 key sketch of the serving shortlist (capped at d; None: none). channel_parts: an index over
    the same
    channel vectors whose per-channel codecs and codes are reused instead of retrained (γ may differ).
    """
    if tables.item_channels.ndim != 3 or tables.item_channels.shape[1] != len(ITEM_CHANNELS):
        raise DimensionMismatchError(f"item_channels must be [N+1, 3, d], got {tuple(tables.item_channels.shape)}")
    if tables.query_channel.shape[-1] != tables.dim:
        raise DimensionMismatchError(f"query_channel dim {tables.query_channel.shape[-1]} != item dim {tables.dim}")
    sources: dict[str, tuple[np.ndarray, int, int]] = {}
    if "channel" in forms and channel_parts is None:
        for j, part in enumerate(ITEM_CHANNELS):
            sources[part] = (tables.item_channels[:, j, :], n_sub, n_centroids)
        sources["query_Q"] = (tables.query_channel, n_sub, n_centroids)
    query_folded, item_folded = tables.query_folded(), tables.item_folded()
    if "folded" in forms:
        fs, fc = folded_n_sub or n_sub, folded_n_centroids or n_centroids
        sources["item_folded"] = (item_folded, fs, fc)
        sources["query_folded"] = (query_folded, fs, fc)
    codecs, codes = {}, {}
    for part, (x, ns, nc) in sources.items():
        codecs[part] = PQCodec.fit(x[1:], ns, nc, max_train=max_train, seed=seed)
        codes[part] = codecs[part].encode(x)
    if "channel" in forms and channel_parts is not None:
        if not channel_parts.has_form("channel") or channel_parts.num_items != len(tables.item_channels):
            raise ValueError(
                f"index {channel_parts.version!r} has no channel parts for {len(tables.item_channels)} items"
            )
        codecs |= {p: channel_parts.codecs[p] for p in CHANNEL_PARTS}
        codes |= {p: channel_parts.codes[p] for p in CHANNEL_PARTS}
    sketch = (
        None
        if sketch_dim is None
        else KeySketch.fit(query_folded, item_folded, min(sketch_dim, tables.dim), max_train, seed=seed)
    )
    return PQIndex(
        version=version,
        codecs=codecs,
        codes=codes,
        query_gamma=float(tables.query_gamma),
        item_gamma=np.asarray(tables.item_gamma, dtype=np.float32),
        query_exact=query_folded.astype(np.float16),
        item_exact=item_folded.astype(np.float16),
        sketch=sketch,
    )
