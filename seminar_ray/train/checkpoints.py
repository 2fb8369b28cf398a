"""Finding checkpoints: a checkpoint directory, or a run directory that resolves to its best checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT_FILE = "model.pt"
METRICS_FILE = "metrics.json"  # the epoch's metrics, inside each checkpoint directory
HISTORY_FILE = "history.json"  # every epoch so far, inside each checkpoint directory
TRAIN_STATE_FILE = "train_state.pt"  # optimizer state and epoch, for resuming
SELECT_METRIC = "ndcg@10"


def run_checkpoints(run_dir: str | Path) -> list[tuple[Path, dict]]:
    """Every checkpoint directory Ray Train kept under `run_dir`, with its metrics, oldest epoch first."""
    found = []
    for model_file in Path(run_dir).glob(f"*/{CHECKPOINT_FILE}"):
        metrics_file = model_file.parent / METRICS_FILE
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        found.append((model_file.parent, metrics))
    return sorted(found, key=lambda pm: pm[1].get("epoch", 0))


def resolve_checkpoint(path: str | Path, metric: str = SELECT_METRIC) -> Path:
    """A checkpoint directory as is; a run directory → its checkpoint with the best validation `metric`."""
    path = Path(path)
    if (path / CHECKPOINT_FILE).exists():
        return path
    if path.is_file() and path.name == CHECKPOINT_FILE:
        return path.parent
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    found = run_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no {CHECKPOINT_FILE}) nor a run directory holding any")
    return max(found, key=lambda pm: (pm[1].get(metric, float("-inf")), pm[1].get("epoch", 0)))[0]
