"""Offline evaluation as Ray Data batch inference: an actor pool scores each user's 100 candidates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from seminar_ray import storage
from seminar_ray.data.entities import EntityTables
from seminar_ray.data.splits import EVAL_NEG, EVAL_SEED, candidates_digest
from seminar_ray.errors import InputError
from seminar_ray.metrics import evaluate_scores, target_ndcg
from seminar_ray.models import load_checkpoint
from seminar_ray.runs import METRICS_FILE, find_checkpoint, resolve_checkpoint

SCORER_CPUS = 0.5


class CandidateScorer:
    """Loads a checkpoint once per actor; scores a batch of evaluation rows (batch contract, C = 100)."""

    def __init__(self, checkpoint: str, data: str):
        torch.set_num_threads(1)
        self.model, _, _ = load_checkpoint(resolve_checkpoint(checkpoint), EntityTables.load(data))
        self.model.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            scores = self.model(
                {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
            )  # Arrow buffers are read-only
        return {
            "user_id": batch["user_id"],
            "query": batch["target_queries"][:, 0],
            "items": batch["target_items"],
            "scores": scores.float().numpy(),
            "history_length": batch["history_length"],
        }


def checkpoint_data_dir(checkpoint: Path) -> str | None:
    from seminar_ray.models.checkpoint import read_checkpoint

    return read_checkpoint(checkpoint)["extra"].get("data")


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str,
    data: str | Path | None = None,
    actors: int = 2,
    batch_size: int = 64,
    max_len: int | None = None,
    eval_seed: int = EVAL_SEED,
    eval_neg: int | None = None,
    per_target: bool = False,
) -> dict:
    """Metrics of the checkpoint (or a run directory's selected one) on the validation or test targets.

    The candidates depend on `eval_seed` and `eval_neg` (negatives per target; None = as many as the run was
    validated with) alone, never on the model's seed: every model ranks the same lists, which the recorded
    `candidates_digest` shows. With `per_target`, out["per_target"] holds each target's user id and NDCG@10, ordered
    by user and positive item, for paired comparisons (`metrics.paired_difference`).
    """
    import ray.data

    from seminar_ray.data.pipeline import eval_dataset, sample_config
    from seminar_ray.models.checkpoint import read_checkpoint

    shared = find_checkpoint(checkpoint)  # what scoring actors on other nodes resolve (a URI stays a URI)
    ckpt = resolve_checkpoint(shared)
    payload = read_checkpoint(ckpt)
    data = str(data or payload["extra"].get("data") or "")
    if not data:
        raise InputError(f"{ckpt}: the checkpoint does not record its data directory; pass --data")
    cfg = payload["config"]
    load_checkpoint(ckpt, EntityTables.load(data))  # fail here, before any Ray work, on a mismatch
    eval_neg = validated_eval_neg(ckpt) if eval_neg is None else eval_neg
    sample = sample_config(data, max_len=max_len or cfg["max_len"], eval_seed=eval_seed, eval_neg=eval_neg)
    rows = eval_dataset(data, split, sample)
    scored = rows.map_batches(
        CandidateScorer,
        fn_constructor_kwargs={"checkpoint": str(shared), "data": data},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=SCORER_CPUS,
    ).to_pandas()
    scores = np.stack(scored["scores"].to_numpy())
    users, items = scored["user_id"].to_numpy(), np.stack(scored["items"].to_numpy())
    query = scored["query"].to_numpy()
    out = evaluate_scores(
        users,
        np.repeat(query[:, None], scores.shape[1], 1),
        scores,
        scored["history_length"].to_numpy(),
    )
    out.update(
        split=split,
        checkpoint=str(shared),
        model=payload["kind"],
        data=data,
        eval_seed=eval_seed,
        eval_neg=eval_neg,
        candidates_digest=candidates_digest(users, items),
    )
    if per_target:
        order = np.lexsort((items[:, 0], users))  # by user, then positive item
        out["per_target"] = {
            "user_id": users[order].tolist(),
            "ndcg@10": np.round(target_ndcg(scores[order]), 6).tolist(),
        }
    return out


def validated_eval_neg(checkpoint: Path) -> int:
    """The negatives per target a checkpoint's run was validated with (runs before --eval-neg: the default)."""
    metrics = checkpoint / METRICS_FILE
    return int(json.loads(metrics.read_text()).get("eval_neg", EVAL_NEG)) if metrics.exists() else EVAL_NEG


def write_metrics(metrics: dict, out_dir: str | Path) -> str | Path:
    path = storage.join(out_dir, "metrics.json")  # out_dir may be a shared URI
    storage.write_text(path, json.dumps(metrics, indent=1))
    return path


def metrics_table(rows: dict[str, dict], keys=("hr@10", "ndcg@5", "ndcg@10", "ndcg@50", "mrr", "auc", "gauc")) -> str:
    """A Markdown table, one row per named metrics dict."""
    head = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |\n" for name, m in rows.items())
