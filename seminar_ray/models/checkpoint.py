"""Checkpoint directories: model.pt holds state_dict, kind, config and the entity-table fingerprint."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import cast

import torch
from torch import nn

from seminar_ray.data.entities import EntityTables
from seminar_ray.errors import InputError
from seminar_ray.models.config import ModelConfig
from seminar_ray.models.layers import MultiModalEmbedding, table_sizes
from seminar_ray.runs import CHECKPOINT_FILE

FORMAT_VERSION = 1


def save_checkpoint(model: nn.Module, cfg: ModelConfig, path_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `path_dir/model.pt` atomically (temp file + rename); `extra` must hold plain Python values / tensors."""
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "kind": model.kind,
        "config": cfg.to_dict(),
        "fingerprint": cast(MultiModalEmbedding, model.embedding).sizes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_FILE}.", dir=out)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out / CHECKPOINT_FILE)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out / CHECKPOINT_FILE


def read_checkpoint(path: str | Path) -> dict:
    """The raw payload of a checkpoint directory (or its model.pt)."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no checkpoint (expected a directory holding {CHECKPOINT_FILE})")
    payload = torch.load(file, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise InputError(f"{file}: checkpoint format {payload.get('format')!r}, this code reads {FORMAT_VERSION}")
    return payload


def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_checkpoint(
    path_dir: str | Path, tables: EntityTables, kind: str | None = None, cfg: ModelConfig | None = None
) -> tuple[nn.Module, ModelConfig, dict]:
    """(model, cfg, extra); ValueError naming what differs when the data sizes, or the expected kind/cfg, do not
    match."""
    from seminar_ray.models import build_model

    payload = read_checkpoint(path_dir)
    if kind is not None and kind != payload["kind"]:
        raise InputError(f"{path_dir}: checkpoint holds a '{payload['kind']}' model, expected '{kind}'")
    diff = _differences(payload["fingerprint"], table_sizes(tables))
    if diff:
        raise InputError(f"{path_dir}: checkpoint was trained on other entity tables ({'; '.join(diff)})")
    saved_cfg = ModelConfig.from_dict(payload["config"])
    if cfg is not None and cfg != saved_cfg:
        raise InputError(f"{path_dir}: config differs ({'; '.join(_differences(saved_cfg.to_dict(), cfg.to_dict()))})")
    model = build_model(payload["kind"], saved_cfg, tables)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model, saved_cfg, payload["extra"]
