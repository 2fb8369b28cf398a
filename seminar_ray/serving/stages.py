"""The two serving stages as plain classes (docs/design.md, Architecture): GSU retrieval, then ESU + MLP scoring.

`RetrievalStage.prepare` turns (history, query, candidates) into a `ScoreJob`: the top-K history positions per
candidate (the `make_retriever` method, DEFAULT_RETRIEVAL unless told; docs/design.md) and a compact history
that keeps only the behaviours the scorer reads (the selected ones and the `recent_len` most recent), so the hop
to the scorer carries O(C·K) ids, not L. `ScoringStage.score_batch` pads several jobs into one [B, C] batch for
`SeminarCTR.score_with_topk`; the compact job scores exactly like the full history (a test checks it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from seminar_ray.data.entities import EntityTables
from seminar_ray.models import SeminarCTR, load_checkpoint
from seminar_ray.models.seminar import gsu_target_tables
from seminar_ray.retrieval.index import PQIndex
from seminar_ray.retrieval.retrievers import ExactRetriever, PQRerankRetriever, SketchRerankRetriever, TopKRetriever
from seminar_ray.runs import CHECKPOINT_FILE, resolve_checkpoint


@dataclass(kw_only=True)
class ScoreJob:
    """What the scorer needs for one request: compact history [Lc], top-K positions into it [C, K] (-1 = none).

    Arrays travel between replicas, so they are compact: int32 ids, int16/int32 positions. Keyword-only: the
    history's query and item ids are arrays of one dtype, so a swap would raise nothing.
    """

    hist_queries: np.ndarray
    hist_items: np.ndarray
    topk: np.ndarray
    candidates: np.ndarray
    query_id: int
    history_len: int  # the full history length the retriever saw
    index_version: str
    full_topk: np.ndarray | None = None  # positions into the full history, for the debug answer (not sent)

    def to_wire(self) -> tuple:
        """The job as the Scorer receives it: raw buffers, ints and a string, which Ray's serializer packs with
        msgpack directly, where a dataclass of numpy arrays goes through pickle (measured in serve_app/README.md)."""
        return (
            self.hist_queries.astype(np.int32, copy=False).tobytes(),
            self.hist_items.astype(np.int32, copy=False).tobytes(),
            self.topk.tobytes(),
            self.topk.shape[1],
            self.topk.dtype.str,
            self.candidates.astype(np.int64, copy=False).tobytes(),
            int(self.query_id),
            int(self.history_len),
            self.index_version,
        )

    @classmethod
    def from_wire(cls, wire: tuple | list) -> ScoreJob:
        queries, items, topk, k, pos_dtype, candidates, query_id, history_len, index_version = wire
        cands = np.frombuffer(candidates, np.int64)
        return cls(
            hist_queries=np.frombuffer(queries, np.int32),
            hist_items=np.frombuffer(items, np.int32),
            topk=np.frombuffer(topk, np.dtype(pos_dtype)).reshape(len(cands), k),
            candidates=cands,
            query_id=query_id,
            history_len=history_len,
            index_version=index_version,
        )


def checkpoint_version(ckpt_dir: Path) -> str:
    """A checkpoint's identity: its directory name and a content hash of model.pt."""
    digest = hashlib.sha256((ckpt_dir / CHECKPOINT_FILE).read_bytes()).hexdigest()[:10]
    return f"{ckpt_dir.name}@{digest}"


def load_serving_model(checkpoint: str | Path, tables: EntityTables) -> tuple[SeminarCTR, str]:
    """(fine-tuned SEMINAR in eval mode, its version) from a checkpoint or run directory."""
    ckpt = resolve_checkpoint(checkpoint)
    model, _, _ = load_checkpoint(ckpt, tables, kind="seminar")
    assert isinstance(model, SeminarCTR)  # kind="seminar" is checked by load_checkpoint
    model.eval()
    model.embedding.cache_entities()
    return model, checkpoint_version(ckpt)


def compact_history(hq: np.ndarray, hi: np.ndarray, topk: np.ndarray, recent: int) -> tuple[np.ndarray, ...]:
    """(queries, items, topk remapped): the behaviours top-K selects plus the last `recent`, in chronological order.

    Compact dtypes for the hop to the scorer: int32 ids, int16 positions (a compact history has ≤ C·K + recent rows).
    """
    L = len(hi)
    kept = np.zeros(L + 1, dtype=bool)  # one spare slot that the -1 entries mark and nothing reads
    kept[topk] = True
    kept[max(L - recent, 0) : L] = True
    kept[L] = False
    keep = np.flatnonzero(kept)
    pos_dtype = np.int16 if len(keep) < np.iinfo(np.int16).max else np.int32
    new_pos = np.cumsum(kept, dtype=np.int64) - 1  # position of each kept behaviour in the compact history
    remapped = np.where(topk >= 0, new_pos[topk], -1).astype(pos_dtype)
    return hq[keep].astype(np.int32), hi[keep].astype(np.int32), remapped


RetrievalMethod = Literal["exact", "pq", "sketch"]
RETRIEVAL_METHODS: tuple[str, ...] = get_args(RetrievalMethod)
# What serving uses unless told otherwise (AppArgs, RetrievalStage); serve_app/README.md says why.
DEFAULT_RETRIEVAL: RetrievalMethod = "exact"


def make_retriever(index: PQIndex, method: str, rerank_factor: int = 8) -> TopKRetriever:
    """The top-K ranker over a serving index (docs/design.md, Retrieval).

    "exact": one GEMM over the index's fp16 folded tables (exact top-K; DEFAULT_RETRIEVAL, serve_app/README.md
    says why).
    "pq": folded-ADC fast-scan shortlist of rerank_factor·K + exact re-rank.
    "sketch": int8 key-sketch shortlist + exact re-rank (needs an index built with a sketch).
    """
    if method == "exact":
        return ExactRetriever(index.query_exact, index.item_exact)
    if method == "pq":
        return PQRerankRetriever(index, rerank_factor=rerank_factor)
    if method == "sketch":
        return SketchRerankRetriever(index)
    raise ValueError(f"retrieval method must be one of {RETRIEVAL_METHODS}, got {method!r}")


class RetrievalStage:
    """GSU target vectors u from the model, top-K from the serving index (paper §3.3.3; docs/design.md, Retrieval).

    One per replica.
    """

    def __init__(self, model: SeminarCTR, index: PQIndex, rerank_factor: int = 8, method: str = DEFAULT_RETRIEVAL):
        if index.dim != model.cfg.d:
            raise ValueError(f"index {index.version!r} has dim {index.dim}, the model's d is {model.cfg.d}")
        n_items = model.embedding.item_text.shape[0]
        if index.num_items != n_items:
            raise ValueError(f"index {index.version!r} has {index.num_items} item rows, the model {n_items}")
        self.model, self.index = model, index
        self.retriever = make_retriever(index, method, rerank_factor)
        self.K, self.max_len, self.recent = model.cfg.K, model.cfg.max_len, model.cfg.recent_len
        self.u_queries, self.u_items = gsu_target_tables(model)  # u per candidate: two row gathers, no model pass

    def prepare(
        self,
        history: tuple[np.ndarray, np.ndarray],
        query_id: int,
        candidates: np.ndarray,
        keep_full_topk: bool = False,
    ) -> ScoreJob:
        hq, hi = (np.asarray(a, dtype=np.int64)[-self.max_len :] for a in history)
        u = self.u_queries[query_id] + self.u_items[candidates]
        topk = self.retriever.topk(hq, hi, u, self.K)
        cq, ci, ctopk = compact_history(hq, hi, topk, self.recent)
        return ScoreJob(
            hist_queries=cq,
            hist_items=ci,
            topk=ctopk,
            candidates=candidates,
            query_id=query_id,
            history_len=len(hi),
            index_version=self.index.version,
            full_topk=topk if keep_full_topk else None,
        )


class ScoringStage:
    """ESU over the K selected behaviours + MLP (paper §3.3.2) for a batch of jobs padded to one tensor batch."""

    def __init__(self, model: SeminarCTR):
        self.model = model

    @torch.no_grad()
    def score_batch(self, jobs: list[ScoreJob]) -> list[np.ndarray]:
        B = len(jobs)
        L = max(1, max(len(j.hist_items) for j in jobs))
        C = max(len(j.candidates) for j in jobs)
        K = max(1, max(j.topk.shape[1] for j in jobs))
        hist_queries, hist_items = np.zeros((B, L), np.int64), np.zeros((B, L), np.int64)
        topk = np.full((B, C, K), -1, np.int64)
        target_queries, target_items = np.zeros((B, C), np.int64), np.zeros((B, C), np.int64)
        for b, j in enumerate(jobs):
            n, c, k = len(j.hist_items), len(j.candidates), j.topk.shape[1]
            hist_queries[b, L - n :], hist_items[b, L - n :] = j.hist_queries, j.hist_items
            topk[b, :c, :k] = np.where(j.topk >= 0, j.topk.astype(np.int64) + (L - n), -1)  # left padding shifts
            target_queries[b, :c], target_items[b, :c] = j.query_id, j.candidates
        logits = self.model.score_with_topk(
            hist_queries=torch.from_numpy(hist_queries),
            hist_items=torch.from_numpy(hist_items),
            topk_idx=torch.from_numpy(topk),
            target_queries=torch.from_numpy(target_queries),
            target_items=torch.from_numpy(target_items),
        )
        scores = torch.sigmoid(logits).numpy()
        return [scores[b, : len(j.candidates)].astype(np.float64) for b, j in enumerate(jobs)]
