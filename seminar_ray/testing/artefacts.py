"""Small self-contained serving artefacts (data, checkpoint, index) for tests, the bench and the demo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seminar_ray.data.entities import EntityTables
from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir
from seminar_ray.models import ModelConfig, build_model, export_gsu_tables, save_checkpoint
from seminar_ray.retrieval.index import build_index


@dataclass(frozen=True)
class ServingArtefacts:
    data: Path
    checkpoint: Path
    index: Path
    store: Path


def build_index_for(checkpoint_model, version: str, out: Path) -> Path:
    """The folded serving index of a SEMINAR model, 4-bit codes as jobs/build_index.py makes them.

    docs/design.md, Retrieval.
    """
    tables = export_gsu_tables(checkpoint_model)
    index = build_index(tables, version, forms=("folded",), folded_n_sub=min(32, tables.dim), folded_n_centroids=16)
    return index.save(out)


def build_artefacts(
    out_dir: str | Path,
    num_users: int = 60,
    min_len: int = 12,
    max_len: int = 60,
    model_max_len: int = 2000,
    seed: int = 0,
    name: str = "ckpt-a",
) -> ServingArtefacts:
    """Synthetic 'tiny' data with histories of min_len..max_len, an untrained SEMINAR (small preset) and its index."""
    out = Path(out_dir)
    data = out / "data"
    if not (data / "meta.json").exists():
        generate_to_dir(SyntheticConfig.preset("tiny", num_users=num_users, min_len=min_len, max_len=max_len), data)
    tables = EntityTables.load(data)
    cfg = ModelConfig.preset("small", max_len=model_max_len, seed=seed)
    model = build_model("seminar", cfg, tables).eval()
    ckpt = out / name
    save_checkpoint(model, cfg, ckpt, extra={"note": "untrained, for serving plumbing"})
    index = build_index_for(model, f"{name}-folded4bit", out / f"index-{name}")
    return ServingArtefacts(data=data, checkpoint=ckpt, index=index, store=out / "history")
