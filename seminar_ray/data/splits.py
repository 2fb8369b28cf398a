"""Leave-one-out splits and sampled candidates (paper §4.1; docs/design.md, Data model).

A user with N behaviours gives N-1 targets: position N-1 is the test target, N-2 the validation
target and every position 1 ≤ n ≤ N-3 a training (and pretraining) target, each with the behaviours
before it as history, left-truncated to L. Two batch forms (models/__init__.py):
- per-target (evaluation, serving): user_id [B]; hist_items, hist_queries [B, L] left-padded with 0;
  target_items, target_queries, labels [B, C] with the positive in column 0; evaluation rows also carry
  history_length [B], the behaviours before the target in the user's whole history (metrics by length);
- user-level (training, `user_batch`): a user's window once, seq_items, seq_queries [R, N]; target_pos,
  target_valid [R, T]; target_items, target_queries, labels [R, T, C].
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
    batch = _batch(seqs.user_id[keep], hist_queries, hist_items, t_queries, t_items)
    return {**batch, "history_length": pos.astype(np.int64)}


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


def _user_negatives(
    rng: np.random.Generator, num_items: int, user_items: np.ndarray, n_targets: int, k: int
) -> np.ndarray:
    """[n_targets, k] negatives, each row k distinct ids outside `user_items`, drawn for all of a user's targets at
    once (a row that the first draw cannot fill is drawn again by `sample_negatives`)."""
    if k == 0 or n_targets == 0:
        return np.empty((n_targets, k), dtype=np.int64)
    exclude = np.unique(user_items)
    draw = rng.integers(1, num_items + 1, size=(n_targets, k + 4))
    ok = ~np.isin(draw, exclude)
    srt = np.sort(draw, axis=1)
    bad = (ok.sum(1) < k) | (srt[:, 1:] == srt[:, :-1]).any(1)  # too few outside the history, or a repeat
    first = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # the first k draws outside the history, in draw order
    out = np.take_along_axis(draw, first, axis=1)
    for j in np.flatnonzero(bad):
        out[j] = sample_negatives(rng, num_items, exclude, k)
    return out


def train_targets(
    seqs: SequenceBatch,
    cfg: SampleConfig,
    epoch: int,
    rows: np.ndarray,
    pos: np.ndarray,
    query_pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(target queries, target items) [n, C] of the training targets (rows, pos): the positive in column 0, then
    num_neg negatives seeded by (seed, user, epoch); for the PSU half the negatives get a query from `query_pool`.

    A function of the targets alone, so the per-target and the user-level batches of an epoch share candidates.
    """
    c = 1 + cfg.num_neg
    t_items = np.empty((len(rows), c), dtype=np.int64)
    absolute = seqs.offsets[rows] + pos
    t_items[:, 0] = seqs.items[absolute]
    t_queries = np.repeat(seqs.queries[absolute][:, None], c, axis=1).astype(np.int64)
    psu_queries = cfg.task == "psu" and query_pool is not None and len(query_pool) > 0
    half = cfg.num_neg // 2  # PSU: half the negatives keep the query (hard item negatives), half get a sampled one
    for u in np.unique(rows):
        mine = np.flatnonzero(rows == u)
        mine = mine[np.argsort(pos[mine], kind="stable")]  # drawn in position order: independent of the batch's order
        rng = _rng(cfg.seed, seqs.user_id[u], 2_000 + epoch)
        t_items[mine, 1:] = _user_negatives(rng, cfg.num_items, seqs.user_items(int(u)), len(mine), cfg.num_neg)
        if psu_queries:
            assert query_pool is not None
            t_queries[mine, 1 + half :] = query_pool[rng.integers(0, len(query_pool), size=(len(mine), c - 1 - half))]
    return t_queries, t_items


def train_batch(
    seqs: SequenceBatch, cfg: SampleConfig, epoch: int, query_pool: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The per-target batch of this epoch's training targets: each target with its own copy of its history [B, L]."""
    rows, pos = train_positions(seqs, cfg, epoch)
    hist_queries, hist_items = history_matrix(seqs, rows, pos, cfg.max_len)
    t_queries, t_items = train_targets(seqs, cfg, epoch, rows, pos, query_pool)
    return _batch(seqs.user_id[rows], hist_queries, hist_items, t_queries, t_items)


def user_rows(rows: np.ndarray, pos: np.ndarray, targets_per_row: int) -> list[np.ndarray]:
    """Indices into (rows, pos) grouped into user-level rows: each user's targets in position order, at most
    `targets_per_row` per row (a row's window spans L before its first target to its last one)."""
    order = np.lexsort((pos, rows))
    starts = np.flatnonzero(np.r_[True, rows[order][1:] != rows[order][:-1]])
    groups: list[np.ndarray] = []
    for a, b in zip(starts, np.r_[starts[1:], len(order)]):
        groups.extend(order[s : min(s + targets_per_row, b)] for s in range(a, b, targets_per_row))
    return groups


def user_batch(
    seqs: SequenceBatch,
    cfg: SampleConfig,
    epoch: int,
    targets_per_row: int,
    query_pool: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The user-level batch of this epoch's training targets (the same targets and candidates as `train_batch`).

    Each row is one user's window of behaviours, left-padded, and up to `targets_per_row` of that user's targets:
    seq_queries, seq_items [R, N]; target_pos [R, T], the target's column, whose history is the columns
    [target_pos - L, target_pos), nothing at or after it; target_valid [R, T]; target_items, target_queries,
    labels [R, T, C]. No history is copied per target: a target costs C ids, a row its window once.
    """
    rows, pos = train_positions(seqs, cfg, epoch)
    t_queries, t_items = train_targets(seqs, cfg, epoch, rows, pos, query_pool)
    groups = user_rows(rows, pos, max(1, targets_per_row))
    n_rows, t = len(groups), max((len(g) for g in groups), default=0)
    firsts = np.array([pos[g[0]] for g in groups], dtype=np.int64)
    lasts = np.array([pos[g[-1]] for g in groups], dtype=np.int64)
    width = int(max(lasts - np.maximum(firsts - cfg.max_len, 0), default=0))
    user = np.array([rows[g[0]] for g in groups], dtype=np.int64)
    seq_queries, seq_items = history_matrix(seqs, user, lasts, max(width, 1))
    before_window = (
        np.arange(seq_items.shape[1]) < (seq_items.shape[1] - (lasts - np.maximum(firsts - cfg.max_len, 0)))[:, None]
    )
    seq_queries[before_window], seq_items[before_window] = 0, 0  # older than every target's history: padding
    c = 1 + cfg.num_neg
    target_pos = np.zeros((n_rows, t), dtype=np.int64)
    valid = np.zeros((n_rows, t), dtype=bool)
    items = np.zeros((n_rows, t, c), dtype=np.int64)
    queries = np.zeros((n_rows, t, c), dtype=np.int64)
    for r, g in enumerate(groups):
        target_pos[r, : len(g)] = seq_items.shape[1] - (lasts[r] - pos[g])  # the last target's column is N
        valid[r, : len(g)] = True
        items[r, : len(g)], queries[r, : len(g)] = t_items[g], t_queries[g]
    labels = np.zeros(items.shape, dtype=np.float32)
    labels[..., 0] = valid
    return {
        "user_id": seqs.user_id[user].astype(np.int64),
        "seq_items": seq_items,
        "seq_queries": seq_queries,
        "target_pos": target_pos,
        "target_valid": valid,
        "target_items": items,
        "target_queries": queries,
        "labels": labels,
    }


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
