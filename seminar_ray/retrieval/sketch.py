"""A low-dimensional int8 sketch of the folded GSU keys, for a cheap shortlist before the exact re-rank
(docs/design.md, Retrieval).

Keys are k = item_folded[i] + query_folded[q] and the projection P [d, S] is linear, so the sketch of a key is the
sum of its two entities' sketches: one int8 row per entity, one small GEMM per request. The sketch error of a
target u on a key k is e = <u_⊥, k_⊥> (the parts outside span P); its variance over keys, σ²(u) = u_⊥ᵀ Σ_⊥ u_⊥,
comes from the residual second moment Σ_⊥ of sampled keys (entity tables only, never user histories).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seminar_ray.retrieval.quantizer import DimensionMismatchError


@dataclass(kw_only=True)
class KeySketch:
    """P [d, S] (top right-singular vectors of the entities), int8 entity sketches with a per-dim scale, Σ_⊥ [d, d]."""

    projection: np.ndarray  # float32 [d, S]
    scale: np.ndarray  # float32 [S]: sketch value = int8 code × scale
    residual_cov: np.ndarray  # float32 [d, d]: E[k_⊥ k_⊥ᵀ] over sampled keys
    query_codes: np.ndarray  # int8 [Q+1, S]
    item_codes: np.ndarray  # int8 [N+1, S]

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def sketch_dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def bytes_per_entity(self) -> int:
        return self.sketch_dim

    @classmethod
    def fit(
        cls,
        query_folded: np.ndarray,
        item_folded: np.ndarray,
        sketch_dim: int = 32,
        max_train: int = 65536,
        search_share: float = 0.5,
        seed: int = 0,
        chunk: int = 1 << 16,
    ) -> KeySketch:
        """Fit on ≤ max_train sampled items/queries; Σ_⊥ from random (query, item) keys, a share of them with query
        0."""
        d = item_folded.shape[1]
        if query_folded.shape[1] != d:
            raise DimensionMismatchError(f"query_folded dim {query_folded.shape[1]} != item_folded dim {d}")
        if not 1 <= sketch_dim <= d:
            raise ValueError(f"sketch_dim must be in 1..{d}, got {sketch_dim}")
        if len(item_folded) < 2:
            raise ValueError("need at least one non-padding item to fit a sketch")
        rng = np.random.default_rng(seed)
        items = np.asarray(item_folded[1 + rng.integers(0, len(item_folded) - 1, max_train)], dtype=np.float32)
        queries = np.asarray(query_folded[rng.integers(0, len(query_folded), max_train)], dtype=np.float32)
        queries[rng.random(max_train) >= search_share] = query_folded[0]  # browse behaviours carry the empty query
        _, _, vt = np.linalg.svd(np.concatenate([items, queries]), full_matrices=False)
        projection = np.ascontiguousarray(vt[:sketch_dim].T, dtype=np.float32)
        keys = items + queries
        residual = keys - (keys @ projection) @ projection.T
        residual_cov = (residual.T @ residual / len(residual)).astype(np.float32)
        top = np.maximum(_abs_max(query_folded, projection, chunk), _abs_max(item_folded, projection, chunk))
        scale = (np.maximum(top, 1e-30) / 127).astype(np.float32)
        encode = lambda x: _encode(x, projection, scale, chunk)  # noqa: E731
        return cls(
            projection=projection,
            scale=scale,
            residual_cov=residual_cov,
            query_codes=encode(query_folded),
            item_codes=encode(item_folded),
        )

    def target(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u's sketch weights [C, S] applied to int8 codes, σ(u) [C]: std of the sketch error over keys)."""
        if u.ndim != 2 or u.shape[1] != self.dim:
            raise DimensionMismatchError(f"target vectors must be [C, {self.dim}], got {tuple(u.shape)}")
        us = u @ self.projection
        perp = u - us @ self.projection.T
        sigma = np.sqrt(np.maximum(((perp @ self.residual_cov) * perp).sum(axis=1), 0.0))
        return (us * self.scale).astype(np.float32), sigma.astype(np.float32)

    def scores(self, query_ids: np.ndarray, item_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Sketch scores [C, L] ≈ <u, k_l> from target weights [C, S] (see target())."""
        keys = self.item_codes[item_ids].astype(np.float32)
        keys += self.query_codes[query_ids]
        return weights @ keys.T


def _abs_max(x: np.ndarray, projection: np.ndarray, chunk: int) -> np.ndarray:
    return np.max(
        [np.abs(np.asarray(x[s : s + chunk], np.float32) @ projection).max(0) for s in range(0, len(x), chunk)], axis=0
    )


def _encode(x: np.ndarray, projection: np.ndarray, scale: np.ndarray, chunk: int) -> np.ndarray:
    out = np.empty((len(x), projection.shape[1]), dtype=np.int8)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = np.clip(np.rint(np.asarray(x[s : s + chunk], np.float32) @ projection / scale), -127, 127)
    return out
