"""SEMINAR and baseline models as plain nn.Modules (paper §3.3); no Ray imports.

Every model takes either batch form: per-target (hist_items/hist_queries [B, L] left-padded, target_items/
target_queries and labels [B, C]) or user-level (seq_items/seq_queries [R, N], target_pos and target_valid [R, T],
target_* and labels [R, T, C]; a target's history is the columns [target_pos − L, target_pos)). It has
`forward(batch) -> logits` shaped like the labels and `loss(batch) -> (loss, parts)` (docs/design.md, "Training on
whole sequences").
"""

from __future__ import annotations

import torch
from torch import nn

from seminar_ray.data.entities import EntityTables
from seminar_ray.errors import InputError
from seminar_ray.models.base import LifelongCTR
from seminar_ray.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from seminar_ray.models.config import ModelConfig
from seminar_ray.models.din import DIN
from seminar_ray.models.eta import ETA
from seminar_ray.models.psu import PSU
from seminar_ray.models.qin import QIN
from seminar_ray.models.seminar import SeminarCTR, export_gsu_tables, restore_psu
from seminar_ray.models.sim import SIM
from seminar_ray.models.twin import TWIN

MODELS: dict[str, type[nn.Module]] = {
    "psu": PSU,
    "seminar": SeminarCTR,
    "sim": SIM,
    "eta": ETA,
    "twin": TWIN,
    "qin": QIN,
    "din": DIN,
}


def build_model(kind: str, cfg: ModelConfig, tables: EntityTables) -> nn.Module:
    """A fresh model of `kind` sized by `tables`, its initial weights seeded by cfg.seed."""
    if kind not in MODELS:
        raise InputError(f"unknown model kind {kind!r}; known: {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return MODELS[kind](cfg, tables)


__all__ = [
    "ModelConfig",
    "build_model",
    "save_checkpoint",
    "load_checkpoint",
    "export_gsu_tables",
    "restore_psu",
    "read_checkpoint",
    "MODELS",
    "PSU",
    "SeminarCTR",
    "SIM",
    "ETA",
    "TWIN",
    "QIN",
    "DIN",
    "LifelongCTR",
]
