"""Validation NDCG@10 per epoch of several runs in one figure, from a curves file such as
bench/out/games/experiments.json: {"runs": {name: {"valid_ndcg@10": [...], "psu_valid_ndcg@10": [...], "test":
{"best_epoch": ...}}}, "popularity": {"valid_ndcg@10": ...}}. Fine-tuning epochs count from 1; a pretrained run's
PSU epochs are drawn dashed before epoch 1, so the PSU's head start and its cost in epochs show side by side.

    python -m bench.plot_curves --input bench/out/games/experiments.json \
        --match "target_products=true, emb_dropout=0.2" --out bench/out/games/validation_curves.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from seminar_ray.errors import InputError
from seminar_ray.runtime import run_cli

ZOOM_FROM = 8  # the right panel starts at this epoch, where the rows are within a few hundredths of each other
SEED_MARKERS = "o^sDv"  # seed 0, 1, ... of one method: one colour, one marker per seed


def select_runs(curves: dict, match: str) -> dict[str, dict]:
    """The runs whose name contains `match` and that have a validation curve, by their short label."""
    runs = {
        short_label(n, match): r for n, r in curves.get("runs", {}).items() if match in n and r.get("valid_ndcg@10")
    }
    if not runs:
        raise InputError(f"no run with a 'valid_ndcg@10' curve has {match!r} in its name")
    return runs


def short_label(name: str, match: str) -> str:
    """The run's name without the part every plotted run shares: "SEMINAR, A=1, seed 1" less "A=1" is
    "SEMINAR, seed 1"."""
    return re.sub(r"(, )+", ", ", name.replace(match, "")).strip(", ") if match else name


def method_and_seed(label: str) -> tuple[str, int]:
    """("SEMINAR", 1) for "SEMINAR, seed 1"; a label without a seed is seed 0."""
    m = re.fullmatch(r"(.*?),? seed (\d+)", label)
    return (m.group(1), int(m.group(2))) if m else (label, 0)


def epoch_points(valid: list[float], start: int) -> list[tuple[int, float]]:
    """(epoch, validation NDCG@10) from epoch `start` on, epochs counted from 1; empty for a run that ended before."""
    return [(e, v) for e, v in enumerate(valid, 1) if e >= start]


def plot(runs: dict[str, dict], popularity: float | None, out: Path, title: str) -> None:
    """Left: every epoch (PSU epochs dashed, at 1-P..0); right: from ZOOM_FROM on. The best epoch is ringed; the
    seeds of one method share its colour and differ by marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors: dict[str, str] = {}  # method → its colour, in order of first appearance
    for name, run in runs.items():
        method, seed = method_and_seed(name)
        color = colors.setdefault(method, f"C{len(colors) % 10}")
        marker = SEED_MARKERS[seed % len(SEED_MARKERS)]
        valid = run["valid_ndcg@10"]
        psu = run.get("psu_valid_ndcg@10") or []
        best = run.get("test", {}).get("best_epoch")
        for ax, start in zip(axes, (1, ZOOM_FROM)):
            shown = epoch_points(valid, start)
            if shown:  # a run stopped before the zoom's first epoch has nothing in that panel
                ax.plot(*zip(*shown), f"{marker}-", ms=3, color=color, label=name)
            if best and best >= start:
                ax.plot(best, valid[best - 1], "o", ms=10, mfc="none", color=color)
        if psu:
            axes[0].plot(range(1 - len(psu), 2), [*psu, valid[0]], "--", color=color, alpha=0.6)
    if popularity is not None:
        axes[0].axhline(popularity, color="grey", ls=":", label="popularity")
    axes[0].set_title("validation NDCG@10 (PSU epochs dashed, at 0 and below)")
    axes[1].set_title(f"from epoch {ZOOM_FROM}; best epoch ringed")
    for ax in axes:
        ax.set_xlabel("fine-tuning epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help="curves file (JSON with a 'runs' map)")
    p.add_argument("--match", default="", help="plot only the runs whose name contains this")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default="", help="figure title (default: the input's name)")
    args = p.parse_args(argv)
    curves = json.loads(args.input.read_text())
    popularity = curves.get("popularity", {}).get("valid_ndcg@10")
    plot(select_runs(curves, args.match), popularity, args.out, args.title or str(args.input))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
