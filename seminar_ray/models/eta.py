"""ETA baseline: SimHash signatures of the embeddings by fixed random projections, Hamming top-K, then ESU."""

from __future__ import annotations

import torch
from torch import Tensor

from seminar_ray.data.entities import EntityTables
from seminar_ray.models.base import Encoded, LifelongCTR
from seminar_ray.models.config import ModelConfig
from seminar_ray.models.layers import masked_topk


class ETA(LifelongCTR):
    hash_projection: Tensor  # a buffer: fixed random hyperplanes [d, bits]
    """Top-K by the number of agreeing SimHash bits sign(x R), R a fixed Gaussian [d, bits] (Chen et al. 2021)."""

    kind = "eta"

    def __init__(self, cfg: ModelConfig, tables: EntityTables):
        super().__init__(cfg, tables)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("hash_projection", torch.randn(cfg.d, cfg.eta_bits, generator=gen))

    def signatures(self, x: Tensor) -> Tensor:
        """±1 SimHash signature [..., bits]."""
        return torch.where(x @ self.hash_projection >= 0, 1.0, -1.0).to(x.dtype)

    @torch.no_grad()
    def retrieve(self, enc: Encoded, with_aux: bool) -> tuple[Tensor, None]:
        # agreeing bits = (bits + <s_t, s_l>) / 2, so ranking by the ±1 inner product is ranking by -Hamming distance
        agree = torch.einsum("bcn,bln->bcl", self.signatures(enc.target), self.signatures(enc.keys))
        # agreements are integers, so ties are common: the more recent behaviour wins (a fraction < 1/2 that grows
        # with the column), whatever the history's layout (a per-target copy or a user's window)
        n = agree.shape[-1]
        recency = torch.arange(n, device=agree.device, dtype=agree.dtype) / (2 * n)
        return masked_topk(agree + recency, enc.mask, self.cfg.K), None
