"""QIN baseline: the target query retrieves K1 behaviours, the target item re-ranks them to K2, then ESU (Guo et al.
2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from seminar_ray.models.base import Encoded, LifelongCTR
from seminar_ray.models.layers import masked_topk


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
        # stage 2 scores every column by one GEMM and keeps the K1 of stage 1 by a mask: a [B, M, N] score matrix
        # instead of [B, M, K1, d] gathered keys
        kept = stage1.new_zeros(enc.mask.shape, dtype=torch.uint8)
        kept.scatter_reduce_(-1, stage1.clamp(min=0), (stage1 >= 0).to(torch.uint8), "amax")
        return masked_topk(torch.einsum("bcd,bld->bcl", item, enc.keys), kept.bool(), cfg.qin_k2), None
