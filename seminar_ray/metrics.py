"""Ranking and CTR metrics (paper §4.1): HR@K, NDCG@K, MRR, AUC, gAUC; overall, per target type and per history
length.

Every ranking metric is its expected value under random tie-breaking: a negative scored equal to
the positive is neither a win nor a loss; the positive's rank is uniform over its tie block.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10, 50)
HISTORY_EDGES = (0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # lower edges of the history-length buckets


def _tie_block(scores: np.ndarray, pos_col: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(#candidates scored above the positive, #other candidates tied with it) per row."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = scores[:, pos_col : pos_col + 1]
    others = np.delete(scores, pos_col, axis=1)
    return (others > pos).sum(axis=1), (others == pos).sum(axis=1)


def _expected(prefix: np.ndarray, above: np.ndarray, ties: np.ndarray, cap: int | None) -> np.ndarray:
    """Mean of f(r) over ranks r = above+1 .. above+ties+1, counting only r ≤ cap; prefix[r] = Σ_{s≤r} f(s)."""
    hi, lo = above + ties + 1, above
    if cap is not None:
        hi, lo = np.minimum(hi, cap), np.minimum(lo, cap)
    return (prefix[hi] - prefix[lo]) / (ties + 1)


def ranking_metrics(scores: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of the positive (column 0) among its candidates, one row per target."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [targets, candidates ≥ 2], got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    above, ties = _tie_block(scores)
    r = np.arange(scores.shape[1] + 1, dtype=np.float64)
    ones = np.concatenate([[0.0], np.ones(scores.shape[1])]).cumsum()
    inv = np.concatenate([[0.0], 1.0 / r[1:]]).cumsum()
    dcg = _dcg_prefix(scores.shape[1])
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(_expected(ones, above, ties, k).mean())
        out[f"ndcg@{k}"] = float(_expected(dcg, above, ties, k).mean())
    out["mrr"] = float(_expected(inv, above, ties, None).mean())
    return out


def _dcg_prefix(candidates: int) -> np.ndarray:
    """[C + 1]: prefix[r] = Σ_{s≤r} 1/log2(s + 1), the gain of a positive at rank r summed from rank 1."""
    r = np.arange(1, candidates + 1, dtype=np.float64)
    return np.concatenate([[0.0], 1.0 / np.log2(r + 1)]).cumsum()


def target_ndcg(scores: np.ndarray, k: int = 10) -> np.ndarray:
    """NDCG@k of each target [targets] (what `ranking_metrics` averages), for paired comparisons of two models on
    the same candidate lists."""
    scores = np.asarray(scores, dtype=np.float64)
    above, ties = _tie_block(scores)
    return _expected(_dcg_prefix(scores.shape[1]), above, ties, k)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean of a − b, its standard error) over targets [targets] that two models ranked alike: the sampling error
    of a difference measured on one test set, smaller than either mean's when the models err on the same targets."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or len(diff) < 2:
        raise ValueError(f"paired_difference needs two equal 1-d arrays of ≥ 2 targets, got shape {diff.shape}")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; ties count one half (Mann-Whitney with average ranks)."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    # average rank within each tie block
    starts = np.concatenate([[0], np.nonzero(np.diff(s))[0] + 1])
    ends = np.concatenate([starts[1:], [len(s)]])
    block_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(block_rank, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(user_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """User-grouped AUC: per-user AUC weighted by the user's number of samples, over users with both classes."""
    user_ids, labels, scores = (np.asarray(a).ravel() for a in (user_ids, labels, scores))
    order = np.argsort(user_ids, kind="mergesort")
    u, lab, sc = user_ids[order], labels[order], scores[order]
    bounds = np.concatenate([[0], np.nonzero(np.diff(u))[0] + 1, [len(u)]])
    total, weight = 0.0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        value = auc(lab[a:b], sc[a:b])
        if np.isfinite(value):
            total += value * (b - a)
            weight += b - a
    return float(total / weight) if weight else float("nan")


def evaluate_scores(
    user_ids: np.ndarray,
    target_queries: np.ndarray,
    scores: np.ndarray,
    history_lengths: np.ndarray | None = None,
) -> dict:
    """All metrics for ranking candidates [targets, C] (positive in column 0), overall, per target type and, given
    each target's history length [targets], per length bucket (`by_history_length`)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.zeros_like(scores)
    labels[:, 0] = 1
    out: dict = dict(ranking_metrics(scores))
    out["auc"] = auc(labels, scores)
    out["gauc"] = gauc(np.repeat(np.asarray(user_ids)[:, None], scores.shape[1], axis=1), labels, scores)
    out["targets"] = int(len(scores))
    search = np.asarray(target_queries)[:, 0] != 0
    for name, rows in (("search", search), ("browse", ~search)):
        if rows.any():
            out[name] = _subset_metrics(scores, rows)
    if history_lengths is not None:
        out["by_history_length"] = by_history_length(scores, np.asarray(history_lengths))
    return out


def history_bucket(length: int) -> str:
    """The HISTORY_EDGES bucket of a history length: "0-4", "5-9", ..., "2000+"."""
    i = int(np.searchsorted(HISTORY_EDGES, length, side="right")) - 1
    lo = HISTORY_EDGES[i]
    return f"{lo}+" if i == len(HISTORY_EDGES) - 1 else f"{lo}-{HISTORY_EDGES[i + 1] - 1}"


def by_history_length(scores: np.ndarray, lengths: np.ndarray) -> dict[str, dict]:
    """Ranking metrics of the targets [targets, C] in each non-empty bucket of the users' history lengths [targets]
    (behaviours before the target, whatever window L a model reads), shortest first: where a lifelong model's
    history helps."""
    if len(lengths) != len(scores):
        raise ValueError(f"history_lengths has {len(lengths)} entries for {len(scores)} targets")
    bucket = np.searchsorted(HISTORY_EDGES, lengths, side="right") - 1  # [targets], an index into HISTORY_EDGES
    out = {}
    for i, lo in enumerate(HISTORY_EDGES):
        rows = bucket == i
        if rows.any():
            out[history_bucket(lo)] = _subset_metrics(scores, rows)
    return out


def _subset_metrics(scores: np.ndarray, rows: np.ndarray) -> dict:
    """Ranking metrics of the targets [targets, C] that `rows` [targets] selects, and how many they are."""
    return {**ranking_metrics(scores[rows]), "targets": int(rows.sum())}
