"""Run directories: the files a run keeps, and which of its checkpoints is selected.

A checkpoint directory holds model.pt (written and read by seminar_ray.models.checkpoint) beside the files named
here; a run directory holds one checkpoint directory per kept epoch; `resolve_checkpoint` turns either (or a
storage path holding exactly one run) into the selected checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from seminar_ray import storage

CHECKPOINT_FILE = "model.pt"  # the model, its config and entity-table fingerprint (seminar_ray.models.checkpoint)
METRICS_FILE = "metrics.json"  # the epoch's metrics, inside each checkpoint directory
HISTORY_FILE = "history.json"  # every epoch so far, inside each checkpoint directory
TRAIN_STATE_FILE = "train_state.pt"  # optimizer state and epoch, for resuming
SELECT_METRIC = "ndcg@10"  # what a CTR run is selected by (validation)
SELECT_KEY = "select"  # each epoch's selection score, recorded in its metrics: higher is better
PATIENCE = 5  # epochs without a better selection score before a run stops early (0 = never)
MAX_EPOCHS = 50  # a CTR model's epochs when none are given: the cap; the stopping rule ends a run sooner


def selection_score(kind: str, metrics: dict) -> float:
    """The one checkpoint-selection rule, applied by every run and by jobs/compare.py.

    A CTR model keeps its epoch with the best validation NDCG@10. A PSU keeps its last epoch: the paper pretrains
    for a fixed budget (§4.1, Figure 3), and the validation ranking comes from the next-pair head, which the
    align-only and relevance-only ablations never train, so it cannot choose among their epochs.
    """
    return float(metrics["epoch"]) if kind == "psu" else float(metrics[SELECT_METRIC])


def stops_early(history: list[dict], patience: int) -> bool:
    """The one stopping rule: True once the last `patience` epochs have not beaten the best selection score of the
    epochs before them (a tie is no improvement). The run keeps its best checkpoint (`best_checkpoint`). A PSU's
    selection score is its epoch, so a PSU never stops early: it pretrains for its stated number of epochs.
    """
    if patience <= 0 or len(history) <= patience:
        return False
    scores = [float(h[SELECT_KEY]) for h in history]
    return max(scores[-patience:]) <= max(scores[:-patience])


def run_checkpoints(run_dir: str | Path) -> list[tuple[str | Path, dict]]:
    """Every checkpoint directory kept under `run_dir` (local path or URI), with its metrics, oldest epoch first."""
    found = []
    for d in storage.subdirs(run_dir):
        if not storage.exists(storage.join(d, CHECKPOINT_FILE)):
            continue
        metrics_file = storage.join(d, METRICS_FILE)
        metrics = json.loads(storage.read_text(metrics_file)) if storage.exists(metrics_file) else {}
        found.append((d, metrics))
    return sorted(found, key=lambda pm: pm[1].get("epoch", 0))


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint directory holds every file a resume reads (a copy cut short holds only some)."""
    return all(
        storage.exists(storage.join(path, f)) for f in (CHECKPOINT_FILE, TRAIN_STATE_FILE, HISTORY_FILE, METRICS_FILE)
    )


def best_checkpoint(found: list[tuple[str | Path, dict]], metric: str = SELECT_KEY) -> tuple[str | Path, dict]:
    """The (checkpoint, metrics) with the highest `metric` (the selection score); the later epoch wins a tie."""
    return max(found, key=lambda pm: (pm[1].get(metric, float("-inf")), pm[1].get("epoch", 0)))


def find_checkpoint(path: str | Path, metric: str = SELECT_KEY) -> str | Path:
    """Like resolve_checkpoint but without downloading: a URI stays a URI.

    `path` is a checkpoint directory, its model.pt, a run directory, or a storage path (a training job's --out)
    holding exactly one run.
    """
    if storage.exists(storage.join(path, CHECKPOINT_FILE)):
        return path
    if storage.basename(path) == CHECKPOINT_FILE and storage.is_file(path):
        return storage.parent(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    found = run_checkpoints(path)
    if found:
        return best_checkpoint(found, metric)[0]
    runs = [d for d in storage.subdirs(path) if run_checkpoints(d)]  # a storage path (--out) holding runs
    if len(runs) == 1:
        return best_checkpoint(run_checkpoints(runs[0]), metric)[0]
    if runs:
        names = ", ".join(str(r) for r in runs)
        raise FileNotFoundError(f"{path}: holds {len(runs)} runs, name one of them: {names}")
    raise FileNotFoundError(f"{path}: neither a checkpoint (no {CHECKPOINT_FILE}) nor a run directory holding any")


def resolve_checkpoint(path: str | Path, metric: str = SELECT_KEY) -> Path:
    """A checkpoint directory as is; a run directory → its selected checkpoint (`selection_score`).

    `path` may be a shared-storage URI; the chosen checkpoint is then mirrored into the node-local cache.
    """
    return storage.local_dir(find_checkpoint(path, metric))
