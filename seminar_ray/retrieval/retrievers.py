"""The GSU top-K searches serving can choose from (`seminar_ray.serving.stages.RETRIEVAL_METHODS`), and the one
contract every retriever keeps, `TopKRetriever.topk` (paper §3.3.3; docs/design.md, Retrieval). The reference
retrievers (the paper's and the benchmark's comparison points) are in reference.py.

Every retriever answers `topk(history_query_ids [L], history_item_ids [L], targets_u [C, d], K,
target_channels=None) -> int64 [C, K]`: positions into the history, best first by the retriever's own score,
ties broken arbitrarily, -1 where fewer than K valid behaviours exist (item id 0 is padding and never
returned); an empty history gives an empty [C, 0] answer. The exact GSU score of behaviour l is <u, k_l>
with k_l = item_folded[i_l] + query_folded[q_l] (tables.py). `target_channels` = (vectors [C, 4, d],
weights [C, 4]) in the order T, I, A, Q is the paper's target pair, needed by the symmetric scorer and
used by the cascading HNSW for its M² cross-channel searches; when given, u must equal Σ weights·vectors.
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import torch

from seminar_ray.retrieval.index import FOLDED_PARTS, PQIndex, check_ids
from seminar_ray.retrieval.quantizer import DimensionMismatchError, lut_scores
from seminar_ray.retrieval.tables import GSUTables

TargetChannels = tuple[np.ndarray, np.ndarray]


def select_topk(scores: np.ndarray, K: int) -> np.ndarray:
    """Positions [C, K] of the K largest scores per row, best first; -1 pads when a row has fewer than K."""
    C, n = scores.shape
    k = min(K, n)
    out = np.full((C, K), -1, dtype=np.int64)
    if k == 0:
        return out
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), (C, n))
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    out[:, :k] = np.take_along_axis(part, order, axis=1)
    return out


class TopKRetriever:
    """Validation, padding removal and -1 padding shared by every retriever; subclasses score the valid part."""

    name = "retriever"

    def __init__(self, dim: int, num_queries: int, num_items: int):
        self.dim, self.num_queries, self.num_items = dim, num_queries, num_items

    def topk(
        self,
        history_query_ids: np.ndarray,
        history_item_ids: np.ndarray,
        targets_u: np.ndarray,
        K: int,
        target_channels: TargetChannels | None = None,
    ) -> np.ndarray:
        hq, hi = np.asarray(history_query_ids, dtype=np.int64), np.asarray(history_item_ids, dtype=np.int64)
        u = np.ascontiguousarray(targets_u, dtype=np.float32)
        if hq.ndim != 1 or hq.shape != hi.shape:
            raise ValueError(f"history ids must be two 1-d arrays of one length, got {hq.shape} and {hi.shape}")
        if u.ndim != 2 or u.shape[1] != self.dim:
            raise DimensionMismatchError(f"targets_u must be [C, {self.dim}], got {tuple(u.shape)}")
        if target_channels is not None and (
            target_channels[0].shape != (len(u), 4, self.dim) or target_channels[1].shape != (len(u), 4)
        ):
            raise DimensionMismatchError(
                f"target_channels must be ([C, 4, {self.dim}], [C, 4]) with C = {len(u)}, got "
                f"{tuple(target_channels[0].shape)} and {tuple(target_channels[1].shape)}"
            )
        if K < 0:
            raise ValueError(f"K must be ≥ 0, got {K}")
        check_ids("item", hi, self.num_items)
        check_ids("query", hq, self.num_queries)
        valid = np.flatnonzero(hi != 0)
        if len(hi) == 0:
            return np.empty((len(u), 0), dtype=np.int64)
        out = np.full((len(u), K), -1, dtype=np.int64)
        if len(valid) == 0 or K == 0:
            return out
        local = self._topk(hq[valid], hi[valid], u, K, target_channels)
        return np.where(local >= 0, valid[np.maximum(local, 0)], -1)

    def _topk(self, hq: np.ndarray, hi: np.ndarray, u: np.ndarray, K: int, tc: TargetChannels | None) -> np.ndarray:
        return select_topk(self.scores(hq, hi, u, tc), K)

    def scores(self, hq: np.ndarray, hi: np.ndarray, u: np.ndarray, tc: TargetChannels | None = None) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} ranks without a dense score matrix")


class ExactRetriever(TopKRetriever):
    """Exact GSU scores from folded per-entity tables gathered by id (fp32: the "exact_fp32" baseline)."""

    name = "exact_fp32"

    def __init__(self, query_folded: np.ndarray, item_folded: np.ndarray):
        super().__init__(item_folded.shape[1], len(query_folded), len(item_folded))
        self.query, self.item = query_folded, item_folded

    @classmethod
    def from_tables(cls, tables: GSUTables) -> ExactRetriever:
        return cls(tables.query_folded(), tables.item_folded())

    def scores(self, hq, hi, u, tc=None):
        keys = self.item[hi].astype(np.float32, copy=False)
        keys += self.query[hq]
        return u @ keys.T


class LUTRetriever(TopKRetriever):
    """Scores from PQ codes by look-up tables built per request: Σ over `parts` of γ_part · LUT_part[codes].

    Subclasses choose the parts and may build their tables differently (`luts`); asymmetric distance computation
    (ADC: exact u, tables N_sub × |C| per part) is the default.
    """

    def __init__(self, index: PQIndex, parts: tuple[str, ...], name: str):
        missing = [p for p in parts if p not in index.codes]
        if missing:
            raise ValueError(f"index {index.version!r} has no {missing} parts (has {sorted(index.codes)})")
        super().__init__(index.dim, index.num_queries, index.num_items)
        self.index, self.parts, self.name = index, parts, name

    def luts(self, u: np.ndarray, tc: TargetChannels | None) -> dict[str, np.ndarray]:
        return {p: self.index.codecs[p].ip_tables(u) for p in self.parts}

    def scores(self, hq, hi, u, tc=None):
        return part_scores(self.index, self.luts(u, tc), hq, hi)


def part_scores(index: PQIndex, luts: dict[str, np.ndarray], hq: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[C, L]: Σ over the parts of `luts` of the part's γ times its look-up sum over the behaviours' codes."""
    out = np.zeros((next(iter(luts.values())).shape[0], len(hi)), dtype=np.float32)
    for part, lut in luts.items():
        ids = hq if part.startswith("query") else hi
        out += lut_scores(lut, index.codes[part][ids]) * index.part_weight(part, ids)
    return out


class ADCRetriever(LUTRetriever):
    """ADC over the folded per-entity codes: two look-ups per behaviour (item_folded + query_folded), ranked in
    faiss where the code width allows (FoldedPairScan)."""

    def __init__(self, index: PQIndex):
        super().__init__(index, FOLDED_PARTS, "adc_folded")
        self.scan = FoldedPairScan(index)

    def _topk(self, hq, hi, u, K, tc):
        return self.scan.topk(hq, hi, u, K)


class FoldedPairScan:
    """ADC over folded codes in faiss: per-request pair codes [query codes | item codes] scored against [u, u]
    (IndexPQ scan for 8-bit; IndexPQFastScan for 4-bit, whose look-up tables faiss rounds to 8 bits); other code
    widths fall back to numpy LUTs."""

    def __init__(self, index: PQIndex):
        self.index = index
        cq, ci = (index.codecs[p] for p in ("query_folded", "item_folded"))
        self.nbits = cq.nbits
        self.pair = None
        if cq.nbits == ci.nbits and cq.nbits in (4, 8) and (cq.n_sub * cq.nbits) % 8 == 0:
            self.pair = faiss.IndexPQ(2 * index.dim, cq.n_sub + ci.n_sub, cq.nbits, faiss.METRIC_INNER_PRODUCT)
            faiss.copy_array_to_vector(
                np.concatenate([cq.centroids.ravel(), ci.centroids.ravel()]), self.pair.pq.centroids
            )
            self.pair.is_trained = True

    def topk(self, hq: np.ndarray, hi: np.ndarray, u: np.ndarray, n: int) -> np.ndarray:
        """ADC top-n positions [C, n] (-1 padded) over a padding-free history."""
        if self.pair is None:
            return select_topk(
                part_scores(self.index, {p: self.index.codecs[p].ip_tables(u) for p in FOLDED_PARTS}, hq, hi), n
            )
        codes = np.concatenate([self.index.codes["query_folded"][hq], self.index.codes["item_folded"][hi]], axis=1)
        if self.nbits == 4:
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        self.pair.reset()
        self.pair.add_sa_codes(np.ascontiguousarray(codes))
        # the SWIG stub lists IndexPQFastScan(int, ...) only; faiss also builds one from a trained IndexPQ
        searcher = faiss.IndexPQFastScan(self.pair) if self.nbits == 4 else self.pair  # type: ignore[arg-type]
        _, pos = searcher.search(np.ascontiguousarray(np.concatenate([u, u], axis=1)), min(n, len(hi)))
        if pos.shape[1] < n:
            pos = np.pad(pos, ((0, 0), (0, n - pos.shape[1])), constant_values=-1)
        return pos


class PQRerankRetriever(TopKRetriever):
    """Retrieval "pq": a folded-ADC shortlist of R·K (FoldedPairScan), then an exact re-rank from the fp16 tables.
    Not thread-safe: one instance per worker."""

    def __init__(self, index: PQIndex, rerank_factor: int = 8):
        super().__init__(index.dim, index.num_queries, index.num_items)
        self.index, self.rerank_factor = index, rerank_factor
        self.scan = FoldedPairScan(index)
        self.pair = self.scan.pair
        self.name = f"serving_adc_folded_r{rerank_factor}"

    def shortlist(self, hq: np.ndarray, hi: np.ndarray, u: np.ndarray, n: int) -> np.ndarray:
        """ADC top-n positions [C, n] (-1 padded) over a padding-free history."""
        return self.scan.topk(hq, hi, u, n)

    def _topk(self, hq, hi, u, K, tc):
        pos = self.shortlist(hq, hi, u, self.rerank_factor * K)
        safe = np.maximum(pos, 0)
        if pos.size >= len(hi):  # shortlists cover the history: gather each behaviour's key once
            keys = self.index.item_exact[hi].astype(np.float32)
            keys += self.index.query_exact[hq]
            sub = keys[safe]
        else:
            sub = self.index.item_exact[hi[safe]].astype(np.float32)
            sub += self.index.query_exact[hq[safe]]
        exact = np.einsum("cd,cnd->cn", u, sub)
        exact[pos < 0] = -np.inf
        best = select_topk(exact, K)
        out = np.take_along_axis(pos, np.maximum(best, 0), axis=1)
        out[(best < 0) | (np.take_along_axis(exact, np.maximum(best, 0), axis=1) == -np.inf)] = -1
        return out


class SketchRerankRetriever(TopKRetriever):
    """Retrieval "sketch" (docs/design.md, Retrieval): an int8 key-sketch shortlist with an adaptive margin, then one
    exact re-rank.

    Per candidate c the shortlist is every behaviour whose sketch score is ≥ (its K-th best sketch score − z·σ(u_c)),
    σ(u_c) being the std of the sketch error for that target (sketch.py); the union of the shortlists over all
    candidates of the request, deduplicated, is re-scored exactly from the fp16 tables with one GEMM, and each
    candidate takes its top-K from the union. Bytes read per behaviour: one int8 sketch row per entity, plus the fp16
    rows of the union only. z is fixed a priori (3σ), not fitted to test users.
    """

    def __init__(self, index: PQIndex, z: float = 3.0):
        if index.sketch is None:
            raise ValueError(f"index {index.version!r} has no key sketch: build it with sketch_dim set")
        super().__init__(index.dim, index.num_queries, index.num_items)
        self.index, self.sketch, self.z = index, index.sketch, z
        self.name = f"serving_sketch{self.sketch.sketch_dim}_z{z:g}"
        with warnings.catch_warnings():  # read-only (memory-mapped) tables: torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            self._item16, self._query16 = (
                torch.from_numpy(np.asarray(t)) for t in (index.item_exact, index.query_exact)
            )
        self.last_union = 0  # behaviours re-ranked exactly by the last call (for benchmarks)

    def shortlist(self, hq: np.ndarray, hi: np.ndarray, u: np.ndarray, K: int) -> np.ndarray:
        """Positions (sorted, distinct) of the union of the candidates' sketch shortlists over a padding-free
        history."""
        if K >= len(hi):
            return np.arange(len(hi))
        weights, sigma = self.sketch.target(u)
        s = self.sketch.scores(hq, hi, weights)
        kth = np.partition(s, len(hi) - K, axis=1)[:, len(hi) - K]
        return np.flatnonzero((s >= (kth - self.z * sigma)[:, None]).any(axis=0))

    def _topk(self, hq, hi, u, K, tc):
        union = self.shortlist(hq, hi, u, K)
        self.last_union = len(union)
        # torch converts fp16 with vector instructions (F16C), numpy's astype element by element (retrieval README)
        keys = self._item16.index_select(0, torch.from_numpy(hi[union])).float()
        keys += self._query16.index_select(0, torch.from_numpy(hq[union]))
        best = select_topk(u @ keys.numpy().T, K)
        return np.where(best >= 0, union[np.maximum(best, 0)], -1)
