"""Rankers without learning, scored on the same candidates as every model (`eval_seed`): the floor a model must beat.

- Popularity: rank candidates by their number of training behaviours (each user's last two are held out).
- QueryMatch+Pop: on `derived` queries (seminar_ray.data.queries) every candidate carries the positive's query, and
  that query was derived from the positive item's own description or category. This rule ranks the candidates whose
  own derived query equals the target's query first, then by popularity: what matching query to item text alone gives.
- Oracle: on synthetic data only, the generator's own probability of each candidate given the user's latent
  interests and the target's query (`seminar_ray.data.synthetic.Oracle`, read from the data's truth.npz): the
  ceiling, what a model that had learned the planted structure exactly would reach.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seminar_ray.data.pipeline import sample_config
from seminar_ray.data.schema import read_table
from seminar_ray.data.splits import EVAL_NEG, EVAL_SEED, SPLIT_OFFSET, SequenceBatch, candidates_digest, eval_batch
from seminar_ray.data.synthetic import TRUTH_FILE, Oracle
from seminar_ray.errors import InputError
from seminar_ray.metrics import evaluate_scores

DATA_RULES = ("popularity", "querymatch_pop")  # scored from the sequences alone (`rule_scores`)
RULES = (*DATA_RULES, "oracle")


def _training_mask(seqs: SequenceBatch) -> np.ndarray:
    """True on behaviours a model may train on: all but each user's validation and test targets."""
    mask = np.ones(len(seqs.items), dtype=bool)
    ends = seqs.offsets[1:]
    for back in SPLIT_OFFSET.values():
        mask[ends[seqs.lengths >= back] - back] = False
    return mask


def item_popularity(seqs: SequenceBatch, num_items: int) -> np.ndarray:
    """[num_items + 1] training-behaviour count of every item id."""
    train = _training_mask(seqs)
    return np.bincount(seqs.items[train], minlength=num_items + 1).astype(np.float64)


def item_queries(seqs: SequenceBatch, num_items: int) -> np.ndarray:
    """[num_items + 1] each item's most frequent non-empty query in the training behaviours (0 = none seen)."""
    train = _training_mask(seqs) & (seqs.queries != 0)
    n_items = num_items + 1
    pairs, counts = np.unique(np.stack([seqs.items[train], seqs.queries[train]]), axis=1, return_counts=True)
    out = np.zeros(n_items, dtype=np.int64)
    if not train.any():
        return out
    order = np.lexsort((counts, pairs[0]))  # by item, then count: the last row of each item is its most frequent
    last = np.r_[pairs[0][order][1:] != pairs[0][order][:-1], True]
    out[pairs[0][order][last]] = pairs[1][order][last]
    return out


def rule_scores(
    rule: str, seqs: SequenceBatch, num_items: int, target_queries: np.ndarray, target_items: np.ndarray
) -> np.ndarray:
    """[targets, C] scores of `rule` for the candidate lists (item ids 1..num_items)."""
    popularity = item_popularity(seqs, num_items)
    scores = popularity[target_items]
    if rule == "popularity":
        return scores
    if rule == "querymatch_pop":
        match = (item_queries(seqs, num_items)[target_items] == target_queries) & (target_queries != 0)
        return scores + match * (popularity.max() + 1.0)
    raise InputError(f"unknown rule {rule!r}; choose from {DATA_RULES} (the oracle: `oracle_scores`)")


def load_oracle(data: str | Path) -> Oracle:
    """The synthetic generator's oracle for the tables in `data`; an error naming the file where there is none."""
    truth = Path(data) / TRUTH_FILE
    if not truth.exists():
        raise InputError(
            f"{truth} not found: the oracle rule needs the synthetic generator's truth "
            "(jobs/prepare_data.py --source synthetic writes it); real data has no oracle"
        )
    return Oracle(truth)


def oracle_scores(oracle: Oracle, split: str, ev: dict[str, np.ndarray]) -> np.ndarray:
    """[targets, C] the generator's log-probabilities of the candidates of `eval_batch`'s lists."""
    queries, items = ev["target_queries"][:, 0], ev["target_items"]
    return np.stack([oracle.score(int(u), int(q), c, split) for u, q, c in zip(ev["user_id"], queries, items)])


def evaluate_rule(
    rule: str, data: str | Path, split: str = "test", eval_seed: int = EVAL_SEED, eval_neg: int = EVAL_NEG
) -> dict:
    """Metrics of `rule` on the split's candidates, exactly those a model evaluated with (`eval_seed`, `eval_neg`)
    ranks."""
    if rule not in RULES:
        raise InputError(f"unknown rule {rule!r}; choose from {RULES}")
    oracle = load_oracle(data) if rule == "oracle" else None  # before any work: real data has none
    seqs = SequenceBatch.from_arrow(read_table(data, "sequences"))
    cfg = sample_config(data, eval_seed=eval_seed, eval_neg=eval_neg)
    ev = eval_batch(seqs, split, cfg)
    if oracle is not None:
        scores = oracle_scores(oracle, split, ev)
    else:
        scores = rule_scores(rule, seqs, cfg.num_items, ev["target_queries"], ev["target_items"])
    out = evaluate_scores(ev["user_id"], ev["target_queries"], scores, ev["history_length"])
    out.update(
        split=split,
        model=rule,
        data=str(data),
        eval_seed=eval_seed,
        eval_neg=eval_neg,
        candidates_digest=candidates_digest(ev["user_id"], ev["target_items"]),
    )
    return out
