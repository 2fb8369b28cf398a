"""TWIN baseline: consistency-preserving GSU, i.e. the ESU's own per-head scores select and attend (Chang et al.
2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from seminar_ray.models.base import Encoded, LifelongCTR
from seminar_ray.models.layers import masked_topk


class TWIN(LifelongCTR):
    """Top-K by the mean over heads of the ESU's α_h over all L; the ESU then attends over the K with the same
    weights."""

    kind = "twin"

    @torch.no_grad()
    def retrieve(self, enc: Encoded, with_aux: bool) -> tuple[Tensor, None]:
        scores = torch.einsum("bcd,bld->bcl", self.esu.folded_query(enc.target), enc.keys)  # mean_h α_h
        return masked_topk(scores, enc.mask, self.cfg.K), None
