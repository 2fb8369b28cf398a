"""What a finished run leaves for a person: metrics.json and a PNG of the training curves."""

from __future__ import annotations

import io
import json
from pathlib import Path

from seminar_ray import storage
from seminar_ray.runs import HISTORY_FILE, best_checkpoint, run_checkpoints, stops_early


def write_run_summary(
    run_dir: str | Path, seconds: float | None = None, *, patience: int = 0, max_epochs: int | None = None
) -> dict:
    """run_dir/metrics.json (best checkpoint, per-epoch history, whether the stopping rule ended the run before
    `max_epochs`) and run_dir/curves.png; run_dir may be a URI."""
    found = run_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: the run left no checkpoint")
    latest = found[-1][0]
    history = json.loads(storage.read_text(storage.join(latest, HISTORY_FILE)))
    best, best_metrics = best_checkpoint(found)
    summary = {
        "run_dir": str(run_dir),
        "best_checkpoint": str(best),
        "best_epoch": best_metrics.get("epoch"),
        "eval_seed": best_metrics.get("eval_seed"),
        "eval_neg": best_metrics.get("eval_neg"),
        "best": best_metrics.get("valid", best_metrics),
        "epochs": len(history),
        "max_epochs": max_epochs,
        "patience": patience,
        "stopped_early": stops_early(history, patience) and (max_epochs is None or len(history) < max_epochs),
        "seconds": seconds,
        "history": [{k: v for k, v in h.items() if k != "valid"} for h in history],
    }
    storage.write_text(storage.join(run_dir, "metrics.json"), json.dumps(summary, indent=1))
    plot_curves(summary["history"], storage.join(run_dir, "curves.png"), title=storage.basename(run_dir))
    return summary


def plot_curves(history: list[dict], out: str | Path, title: str) -> None:
    """Training loss and validation NDCG@10 / HR@10 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.set_xlabel("epoch"), ax_loss.set_title("training loss"), ax_loss.grid(alpha=0.3)
    for key in ("ndcg@10", "hr@10", "auc"):
        if key in history[0]:
            ax_val.plot(epochs, [h[key] for h in history], "o-", label=key)
    ax_val.set_xlabel("epoch"), ax_val.set_title("validation"), ax_val.legend(), ax_val.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(out, buf.getvalue())
