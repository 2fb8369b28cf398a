"""Reference retrievers: the paper's and the benchmark's GSU retrievers, kept as comparison points (paper §3.3.3,
§4.2.2, Table 4; docs/design.md, Retrieval): the paper's symmetric multi-modal PQ, per-channel ADC, cascading HNSW,
SimHash LSH and residual quantization. Serving cannot choose them; bench/retrieval.py measures them against the
searches of retrievers.py, whose contract (`TopKRetriever.topk`) they keep.
"""

from __future__ import annotations

import faiss
import numpy as np

from seminar_ray.retrieval.index import CHANNEL_PARTS, PQIndex
from seminar_ray.retrieval.quantizer import capped_centroids, lut_scores, unpack_codes
from seminar_ray.retrieval.retrievers import ExactRetriever, LUTRetriever, TopKRetriever, select_topk
from seminar_ray.retrieval.tables import GSUTables


class ChannelADCRetriever(LUTRetriever):
    """ADC over the paper's per-channel codes: Σ_j γ_j LUT_j over T, I, A and Q (four look-ups per behaviour)."""

    def __init__(self, index: PQIndex):
        super().__init__(index, CHANNEL_PARTS, "adc_channel")


class SymmetricPQRetriever(ChannelADCRetriever):
    """The paper's multi-modal PQ (§3.3.3): the target's channels are quantized too and
    q_t·k_l ≈ Σ_i Σ_j γ_i γ_j Σ_b <c_b^(i), c_b^(j)> from inner-product centroid-centroid tables.

    The look-ups of one target channel are summed into its per-request table first (same sums, fewer adds).
    Needs target_channels; a trained GSU's folded u has no channels, which is one reason ADC serves instead.
    """

    def __init__(self, index: PQIndex):
        super().__init__(index)
        self.name = "symmetric_pq"
        self.cross = {
            (i, j): index.codecs[i].cross_ip_tables(index.codecs[j]) for i in CHANNEL_PARTS for j in CHANNEL_PARTS
        }

    def luts(self, u, tc):
        if tc is None:
            raise ValueError("symmetric PQ quantizes the target's channels: pass target_channels=(vectors, weights)")
        vectors, weights = tc
        n_sub = self.index.codecs[CHANNEL_PARTS[0]].n_sub
        rows = np.arange(n_sub)
        luts = {}
        for j in CHANNEL_PARTS:
            lut = np.zeros((len(u), n_sub, self.index.codecs[j].n_centroids))
            for c_i, i in enumerate(CHANNEL_PARTS):
                codes_t = self.index.codecs[i].encode(vectors[:, c_i, :])  # [C, n_sub]
                lut = lut + weights[:, c_i, None, None] * self.cross[(i, j)][rows, codes_t]  # [C, n_sub, |C_j|]
            luts[j] = lut.astype(np.float32)
        return luts


class CascadingHNSWRetriever(TopKRetriever):
    """Cascading ANN (paper §3.3.3): M² cross-channel HNSW searches keep K each, then an exact re-rank.

    Restriction to the history: per request, one small faiss IndexHNSWFlat (inner product) per behaviour
    channel (T, I, A over the history's distinct items, Q over its distinct queries); each target channel
    searches each index for its K best entities, every behaviour holding a hit joins that target's candidate set,
    and the candidates are re-ranked by the exact fp32 score (one GEMM over the union of the targets' sets). (A global
    index filtered to the history would need
    ef ≫ catalogue/L to find K history members.) Without target_channels, u alone searches the 4 indexes.
    """

    name = "hnsw_cascade"

    def __init__(self, tables: GSUTables, hnsw_m: int = 16, ef_search: int = 128):
        super().__init__(tables.dim, len(tables.query_channel), len(tables.item_channels))
        self.tables, self.hnsw_m, self.ef_search = tables, hnsw_m, ef_search
        self.exact = ExactRetriever.from_tables(tables)
        self._cached: tuple[bytes, list] | None = None  # the last history's indexes, reused across calls

    def _channel_indexes(self, hq: np.ndarray, hi: np.ndarray) -> list:
        key = hq.tobytes() + b"|" + hi.tobytes()
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        built = []
        for j in range(4):
            uniq, inverse = np.unique(hi if j < 3 else hq, return_inverse=True)
            vecs = self.tables.item_channels[uniq, j, :] if j < 3 else self.tables.query_channel[uniq]
            hnsw = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.add(np.ascontiguousarray(vecs, dtype=np.float32))
            built.append((hnsw, len(uniq), inverse.ravel()))
        self._cached = (key, built)
        return built

    def _topk(self, hq, hi, u, K, tc):
        queries = [u] if tc is None else [np.ascontiguousarray(tc[0][:, i, :]) for i in range(4)]
        hit = np.zeros((len(u), len(hi)), dtype=bool)
        for hnsw, n_uniq, inverse in self._channel_indexes(hq, hi):
            hnsw.hnsw.efSearch = max(self.ef_search, K)
            for q in queries:
                _, found = hnsw.search(q, min(K, n_uniq))
                entity_hit = np.zeros((len(u), n_uniq + 1), dtype=bool)  # column n_uniq absorbs faiss's -1
                np.put_along_axis(entity_hit, np.where(found >= 0, found, n_uniq), True, axis=1)
                hit |= entity_hit[:, inverse]  # every behaviour of a found entity joins
        union = np.flatnonzero(hit.any(axis=0))  # one exact re-rank over the candidates' union
        scores = self.exact.scores(hq[union], hi[union], u)
        scores[~hit[:, union]] = -np.inf
        best = select_topk(scores, K)
        found_best = np.take_along_axis(scores, np.maximum(best, 0), axis=1) > -np.inf
        return np.where((best >= 0) & found_best, union[np.maximum(best, 0)], -1)


class LSHRetriever(TopKRetriever):
    """SimHash (ETA-style): sign bits of random projections of u and of each behaviour key, ranked by Hamming
    distance (an angular estimate, blind to key norms). Keys are hashed per request: a behaviour's key is a sum
    of two entities' vectors, and the hash of a sum is not a function of the two hashes."""

    name = "lsh_simhash"

    def __init__(self, tables: GSUTables, n_bits: int = 256, seed: int = 0):
        super().__init__(tables.dim, len(tables.query_channel), len(tables.item_channels))
        self.exact = ExactRetriever.from_tables(tables)
        self.planes = np.random.default_rng(seed).standard_normal((tables.dim, n_bits)).astype(np.float32)

    def _hash(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(x @ self.planes > 0, axis=1)

    def scores(self, hq, hi, u, tc=None):
        keys = self.exact.item[hi] + self.exact.query[hq]
        hk, hu = self._hash(keys), self._hash(u)
        return -np.stack([np.bitwise_count(hk ^ h).sum(axis=1) for h in hu]).astype(np.float32)


class RQRetriever(TopKRetriever):
    """Residual quantization of the folded entity vectors (faiss ResidualQuantizer, our stand-in for RQ-VAE),
    scored by ADC: <u, Σ_m c_m> = Σ_m LUT_m[code_m]."""

    name = "rq"

    def __init__(
        self,
        tables: GSUTables,
        n_levels: int = 8,
        nbits: int = 8,
        max_train: int = 32768,
        encode_ids: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ):
        """encode_ids = (query ids, item ids) restricts encoding to the entities a benchmark touches."""
        super().__init__(tables.dim, len(tables.query_channel), len(tables.item_channels))
        if not 1 <= nbits <= 8:
            raise ValueError(f"RQRetriever keeps one byte per level: nbits must be in 1..8, got {nbits}")
        self.n_levels = n_levels
        self.codebooks, self.codes = {}, {}
        rng = np.random.default_rng(seed)
        wanted = None if encode_ids is None else dict(zip(("query", "item"), encode_ids))
        # items first: the rng's draws, so the benchmarks' codebooks, follow this order
        for part, x in (("item", tables.item_folded()), ("query", tables.query_folded())):
            train = x[1:] if len(x) - 1 <= max_train else x[1 + rng.choice(len(x) - 1, max_train, replace=False)]
            k = capped_centroids(len(train), 2**nbits)
            rq = faiss.ResidualQuantizer(self.dim, n_levels, k.bit_length() - 1)
            rq.max_beam_size = 1
            # plain residual k-means: progressive-dim training costs far more for the same reconstruction error
            # (measured in seminar_ray/retrieval/README.md, "Departures and notes")
            rq.train_type = faiss.ResidualQuantizer.Train_default
            rq.train(np.ascontiguousarray(train, dtype=np.float32))
            ids = np.arange(len(x)) if wanted is None else np.unique(wanted[part])
            codes = np.zeros((len(x), n_levels), dtype=np.uint8)
            packed = rq.compute_codes(np.ascontiguousarray(x[ids], dtype=np.float32))
            codes[ids] = unpack_codes(packed, n_levels, k.bit_length() - 1)
            self.codes[part] = codes
            self.codebooks[part] = faiss.vector_to_array(rq.codebooks).reshape(n_levels, k, self.dim)

    def scores(self, hq, hi, u, tc=None):
        out = lut_scores(np.einsum("cd,mkd->cmk", u, self.codebooks["item"]), self.codes["item"][hi])
        out += lut_scores(np.einsum("cd,mkd->cmk", u, self.codebooks["query"]), self.codes["query"][hq])
        return out
