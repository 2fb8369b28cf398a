"""Leave-one-out splits and sampled candidates (paper §4.1; docs/design.md, Data model).

A user with N behaviours gives N-1 targets: position N-1 is the test target, N-2 the validation
target and every position 1 ≤ n ≤ N-3 a training (and pretraining) target, each with the behaviours
before it as history, left-truncated to L. Batches follow the batch contract:
user_id [B]; hist_items, hist_queries [B, L] left-padded with 0; target_items, target_queries,
labels [B, C] with the positive in column 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from seminar_ray.data.errors import DataError

SPLIT_OFFSET = {"test": 1, "valid": 2}  # target position = N - offset
EVAL_SEED = 0  # the evaluation protocol's seed: the same users and negatives for every model, seed and epoch
EVAL_NEG = 99  # the protocol's sampled negatives per evaluation target (paper: 99; Kang & McAuley's SASRec: 100)


@dataclass(frozen=True)
class SampleConfig:
    """How targets and negatives are drawn."""

    max_len: int = 200  # L: history left-truncated to the most recent L behaviours
    num_items: int = 0  # item ids are 1..num_items
    num_neg: int = 4  # sampled negatives per training target (C = 1 + num_neg)
    eval_neg: int = EVAL_NEG  # negatives per evaluation target
    samples_per_user: int = 8  # training targets drawn per user per epoch; 0 = every training position
    task: str = "ctr"  # "ctr": negatives share the positive's query; "psu": negatives get sampled queries too
    seed: int = 0  # the model's seed: training targets and negatives
    eval_seed: int = EVAL_SEED  # validation/test negatives: independent of the model's seed, fixed across models


@dataclass(kw_only=True)
class SequenceBatch:
    """Per-user sequences of a record batch as flat arrays + offsets (no Python lists per row)."""

    user_id: np.ndarray
    queries: np.ndarray
    items: np.ndarray
    offsets: np.ndarray  # [U+1]

    @classmethod
    def from_arrow(cls, batch: pa.Table | pa.RecordBatch) -> SequenceBatch:
        items = _combine(batch.column("item_ids"))
        queries = _combine(batch.column("query_ids"))
        offsets = items.offsets.to_numpy()
        return cls(
            user_id=np.asarray(batch.column("user_id").to_numpy(), dtype=np.int64),
            queries=queries.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64),
            items=items.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64),
            offsets=offsets - offsets[0],
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_items(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]


def _combine(col) -> pa.ListArray:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *[int(k) for k in keys]])


def history_matrix(
    seqs: SequenceBatch, rows: np.ndarray, positions: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(query ids, item ids), left-padded [B, L], of the behaviours before `positions` (relative to each user's
    start)."""
    b = len(rows)
    starts = seqs.offsets[rows] + np.maximum(positions - max_len, 0)
    ends = seqs.offsets[rows] + positions
    lens = ends - starts
    col = np.arange(max_len)[None, :]
    src = ends[:, None] - max_len + col  # right-aligned source index
    valid = col >= (max_len - lens)[:, None]
    src = np.where(valid, src, 0)
    hist_queries = np.where(valid, seqs.queries[src] if len(seqs.queries) else 0, 0)
    hist_items = np.where(valid, seqs.items[src] if len(seqs.items) else 0, 0)
    return hist_queries.astype(np.int64).reshape(b, max_len), hist_items.astype(np.int64).reshape(b, max_len)


def sample_negatives(rng: np.random.Generator, num_items: int, exclude: np.ndarray, k: int) -> np.ndarray:
    """k distinct item ids in 1..num_items, none in `exclude` (the user's items)."""
    exclude = np.unique(exclude)
    free = num_items - len(exclude)
    if free < k:
        raise DataError(f"cannot sample {k} negatives: only {free} of {num_items} items are outside the user's history")
    picked = np.empty(0, dtype=np.int64)
    while len(picked) < k:
        draw = rng.integers(1, num_items + 1, size=2 * (k - len(picked)) + 8)
        draw = draw[~np.isin(draw, exclude) & ~np.isin(draw, picked)]
        _, first = np.unique(draw, return_index=True)
        picked = np.concatenate([picked, draw[np.sort(first)]])[:k]
    return picked


def eval_batch(
    seqs: SequenceBatch, split: str, cfg: SampleConfig, users: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The validation or test target of every user (of `users` when given) with its 99 negatives sharing its query.

    Negatives are a function of (cfg.eval_seed, user, split) alone: every model, seed and epoch ranks the same lists.
    """
    if split not in SPLIT_OFFSET:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSET)}, got {split!r}")
    lengths = seqs.lengths
    chosen = np.ones(len(lengths), dtype=bool) if users is None else np.isin(seqs.user_id, users)
    keep = np.nonzero((lengths >= 3) & chosen)[0]
    pos = lengths[keep] - SPLIT_OFFSET[split]
    hist_queries, hist_items = history_matrix(seqs, keep, pos, cfg.max_len)
    c = 1 + cfg.eval_neg
    t_items = np.empty((len(keep), c), dtype=np.int64)
    t_queries = np.empty((len(keep), c), dtype=np.int64)
    for j, (u, p) in enumerate(zip(keep, pos)):
        absolute = seqs.offsets[u] + p
        t_items[j, 0] = seqs.items[absolute]
        rng = _rng(cfg.eval_seed, seqs.user_id[u], SPLIT_OFFSET[split])
        t_items[j, 1:] = sample_negatives(rng, cfg.num_items, seqs.user_items(int(u)), cfg.eval_neg)
        t_queries[j] = seqs.queries[absolute]
    return _batch(seqs.user_id[keep], hist_queries, hist_items, t_queries, t_items)


def eval_users(user_ids: np.ndarray, lengths: np.ndarray, n: int, eval_seed: int = EVAL_SEED) -> np.ndarray | None:
    """A fixed set of `n` evaluable users (≥ 3 behaviours) drawn by `eval_seed`, sorted; None = every user (n = 0)."""
    candidates = np.sort(np.asarray(user_ids)[np.asarray(lengths) >= 3])
    if n <= 0 or n >= len(candidates):
        return None
    return np.sort(np.random.default_rng([eval_seed, 3]).choice(candidates, size=n, replace=False))


def candidates_digest(user_ids: np.ndarray, target_items: np.ndarray) -> str:
    """A fingerprint of evaluation candidate lists, independent of row order: equal digests = identical protocol."""
    import hashlib

    order = np.argsort(user_ids, kind="stable")
    rows = np.concatenate([np.asarray(user_ids)[order, None], np.asarray(target_items)[order]], axis=1)
    return hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def train_positions(seqs: SequenceBatch, cfg: SampleConfig, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Training targets of this epoch: up to `samples_per_user` distinct positions 1..N-3 per user (all of them when
    samples_per_user is 0, as SASRec-style training does), seeded by (seed, user, epoch)."""
    rows, positions = [], []
    for u, n in enumerate(seqs.lengths):
        n_targets = int(n) - 3
        if n_targets < 1:
            continue
        rng = _rng(cfg.seed, seqs.user_id[u], 1_000 + epoch)
        k = n_targets if cfg.samples_per_user <= 0 else min(cfg.samples_per_user, n_targets)
        rows.append(np.full(k, u))
        positions.append(1 + rng.choice(n_targets, size=k, replace=False))
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(positions).astype(np.int64)


def train_batch(
    seqs: SequenceBatch, cfg: SampleConfig, epoch: int, query_pool: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Training samples of this epoch for every user of the batch (CTR or PSU negatives, see SampleConfig)."""
    rows, pos = train_positions(seqs, cfg, epoch)
    hist_queries, hist_items = history_matrix(seqs, rows, pos, cfg.max_len)
    c = 1 + cfg.num_neg
    t_items = np.empty((len(rows), c), dtype=np.int64)
    t_queries = np.empty((len(rows), c), dtype=np.int64)
    absolute = seqs.offsets[rows] + pos
    t_items[:, 0] = seqs.items[absolute]
    t_queries[:] = seqs.queries[absolute][:, None]
    for j, (u, p) in enumerate(zip(rows, pos)):
        rng = _rng(cfg.seed, seqs.user_id[u], 2_000 + epoch, p)
        t_items[j, 1:] = sample_negatives(rng, cfg.num_items, seqs.user_items(u), cfg.num_neg)
        if cfg.task == "psu" and query_pool is not None and len(query_pool):
            half = cfg.num_neg // 2  # half the negatives keep the query (hard item negatives), half get a sampled one
            t_queries[j, 1 + half :] = query_pool[rng.integers(0, len(query_pool), size=cfg.num_neg - half)]
    return _batch(seqs.user_id[rows], hist_queries, hist_items, t_queries, t_items)


def _batch(user_id, hist_queries, hist_items, t_queries, t_items) -> dict[str, np.ndarray]:
    labels = np.zeros(t_items.shape, dtype=np.float32)
    labels[:, 0] = 1.0
    return {
        "user_id": np.asarray(user_id, dtype=np.int64),
        "hist_items": hist_items,
        "hist_queries": hist_queries,
        "target_items": t_items,
        "target_queries": t_queries,
        "labels": labels,
    }
