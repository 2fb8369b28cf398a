"""QIN baseline: the target query retrieves K1 behaviours, the target item re-ranks them to K2, then ESU (Guo et al.
2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from seminar_ray.models.base import Encoded, LifelongCTR
from seminar_ray.models.layers import gather_rows, masked_topk


class QIN(LifelongCTR):
    """Stage 1: <x^Q_t, k_l> keeps K1; stage 2: <Σ_j γ_j x^(j)_t, k_l> over the K1 keeps K2 (parameter-free
    relevance)."""

    kind = "qin"

    @torch.no_grad()
    def retrieve(self, enc: Encoded, with_aux: bool) -> tuple[Tensor, None]:
        cfg = self.cfg
        query = enc.target_channels[..., 0, :]
        stage1 = masked_topk(torch.einsum("bcd,bld->bcl", query, enc.keys), enc.mask, cfg.qin_k1)
        item = enc.target - self.embedding.lam * query  # the target's item part Σ_j γ_j x^(j)_t
        stage2_scores = torch.einsum("bcd,bckd->bck", item, gather_rows(enc.keys, stage1))
        local = masked_topk(stage2_scores, stage1 >= 0, cfg.qin_k2)
        return stage1.gather(-1, local.clamp(min=0)).masked_fill(local < 0, -1), None
