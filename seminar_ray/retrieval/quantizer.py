"""Product quantizers for GSU-space vectors (paper §3.3.3): codebooks, codes, and inner-product look-up tables."""

from __future__ import annotations

import math
import warnings

import faiss
import numpy as np

MIN_POINTS_PER_CENTROID = 39  # faiss k-means warns below this; docs/design.md, Retrieval


def capped_centroids(n_train: int, n_centroids: int, min_points: int = MIN_POINTS_PER_CENTROID) -> int:
    """The largest power of two ≤ n_centroids with ≥ min_points training points each (warns when it caps)."""
    if n_train < 2:
        raise ValueError(f"need at least 2 training vectors to build a codebook, got {n_train}")
    if n_centroids < 2 or n_centroids & (n_centroids - 1):
        raise ValueError(f"n_centroids must be a power of two ≥ 2, got {n_centroids}")
    if n_train >= min_points * n_centroids:
        return n_centroids
    capped = max(2, 2 ** int(math.floor(math.log2(max(n_train // min_points, 1)))))
    warnings.warn(
        f"|C| capped from {n_centroids} to {capped}: {n_train} training vectors give fewer than "
        f"{min_points} per centroid",
        stacklevel=3,
    )
    return capped


class PQCodec:
    """One faiss ProductQuantizer: N_sub sub-vectors of d/N_sub dims, |C| = 2**nbits centroids each (paper §3.3.3).

    Codes are kept unpacked, one sub-quantizer index per column (uint8 for nbits ≤ 8, uint16 above).
    8-bit codes (|C| = 256) and 4-bit codes (|C| = 16, faiss fast-scan) are the fast paths; 9-bit codes
    (the paper's |C| = 512) make faiss fall back to its slow generic bit-string encoder/decoder.
    """

    def __init__(self, dim: int, n_sub: int = 8, n_centroids: int = 256):
        if dim % n_sub:
            raise ValueError(f"dim {dim} is not divisible by n_sub {n_sub}")
        if n_centroids < 2 or n_centroids & (n_centroids - 1):
            raise ValueError(f"n_centroids must be a power of two ≥ 2, got {n_centroids}")
        self.dim, self.n_sub, self.n_centroids = dim, n_sub, n_centroids
        self.pq = faiss.ProductQuantizer(dim, n_sub, int(math.log2(n_centroids)))
        self.trained = False

    @property
    def nbits(self) -> int:
        return int(self.pq.nbits)

    @property
    def dsub(self) -> int:
        return self.dim // self.n_sub

    @property
    def code_dtype(self) -> type:
        return np.uint8 if self.nbits <= 8 else np.uint16

    @property
    def bytes_per_code(self) -> float:
        """Bytes of one packed code (what an entity costs in memory once packed)."""
        return self.n_sub * self.nbits / 8

    @classmethod
    def fit(
        cls, x: np.ndarray, n_sub: int = 8, n_centroids: int = 256, max_train: int = 65536, seed: int = 0
    ) -> PQCodec:
        """Train on x [n, d]; |C| is capped (with a warning) below 39 training points per centroid."""
        x = _as_f32(x)
        if len(x) > max_train:
            x = x[np.random.default_rng(seed).choice(len(x), max_train, replace=False)]
        codec = cls(x.shape[1], n_sub, capped_centroids(len(x), n_centroids))
        codec.pq.cp.seed = seed
        codec.pq.verbose = False
        codec.pq.cp.max_points_per_centroid = max(256, len(x) // codec.n_centroids + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            codec.pq.train(np.ascontiguousarray(x))
        codec.trained = True
        return codec

    @classmethod
    def from_centroids(cls, centroids: np.ndarray) -> PQCodec:
        """A codec with a given codebook [n_sub, |C|, dsub] (e.g. the data itself: lossless)."""
        n_sub, k, dsub = centroids.shape
        codec = cls(n_sub * dsub, n_sub, k)
        faiss.copy_array_to_vector(_as_f32(centroids).ravel(), codec.pq.centroids)
        codec.pq.sync_transposed_centroids()
        codec.trained = True
        return codec

    @property
    def centroids(self) -> np.ndarray:
        """[n_sub, |C|, dsub] float32."""
        return faiss.vector_to_array(self.pq.centroids).reshape(self.n_sub, self.n_centroids, self.dsub)

    def encode(self, x: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """Codes [n, n_sub] (nearest centroid per sub-vector, L2, as faiss assigns)."""
        self._check(x)
        out: np.ndarray = np.empty((len(x), self.n_sub), dtype=self.code_dtype)
        for s in range(0, len(x), chunk):
            out[s : s + chunk] = self._unpack(self.pq.compute_codes(_as_f32(x[s : s + chunk])))
        return out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstructed vectors [n, d] from codes [n, n_sub]."""
        cent = self.centroids
        return np.concatenate([cent[b][codes[:, b]] for b in range(self.n_sub)], axis=1)

    def ip_tables(self, u: np.ndarray) -> np.ndarray:
        """ADC look-up tables [C, n_sub, |C|]: <u_b, centroid_bk> for exact targets u [C, d]."""
        self._check(u)
        return np.einsum("cbs,bks->cbk", _as_f32(u).reshape(len(u), self.n_sub, self.dsub), self.centroids)

    def cross_ip_tables(self, other: PQCodec) -> np.ndarray:
        """Symmetric centroid-centroid tables [n_sub, |C_self|, |C_other|] of inner products (faiss's are L2 only)."""
        if other.dim != self.dim or other.n_sub != self.n_sub:
            raise ValueError(f"codecs disagree: dim {self.dim}/{other.dim}, n_sub {self.n_sub}/{other.n_sub}")
        return np.einsum("bks,bjs->bkj", self.centroids, other.centroids)

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        return unpack_codes(packed, self.n_sub, self.nbits)

    def _check(self, x: np.ndarray) -> None:
        if not self.trained:
            raise RuntimeError("PQCodec is not trained: call PQCodec.fit or PQCodec.from_centroids")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DimensionMismatchError(f"expected vectors of shape [n, {self.dim}], got {tuple(x.shape)}")


class DimensionMismatchError(ValueError):
    """A vector's dimension does not match the index / codebook dimension."""


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def unpack_codes(packed: np.ndarray, n_sub: int, nbits: int) -> np.ndarray:
    """faiss's packed codes [n, ⌈n_sub·nbits/8⌉] (bit strings, least significant first) → one column per
    sub-quantizer [n, n_sub] (uint8 for nbits ≤ 8, uint16 above)."""
    if nbits == 8:
        return packed
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : n_sub * nbits]
    bits = bits.reshape(len(packed), n_sub, nbits).astype(np.uint32)
    return (bits << np.arange(nbits, dtype=np.uint32)).sum(axis=2).astype(np.uint8 if nbits <= 8 else np.uint16)


def lut_scores(luts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Σ_b luts[c, b, codes[l, b]] → [C, L] (the ADC / symmetric look-up sum)."""
    out = np.zeros((luts.shape[0], codes.shape[0]), dtype=np.float32)
    for b in range(codes.shape[1]):
        out += luts[:, b, :][:, codes[:, b]]
    return out
