"""SIM baseline: soft-search GSU (one-head target attention with its auxiliary loss), then ESU (Pi et al. 2020)."""

from __future__ import annotations

from torch import Tensor

from seminar_ray.data.entities import EntityTables
from seminar_ray.models.base import Encoded, LifelongCTR, SoftSearchGSU
from seminar_ray.models.config import ModelConfig


class SIM(LifelongCTR):
    """Soft search: top-K by <W^Q q_t, W^K k_l>, trained by L = L_ESU + β·L_GSU; no pretraining, no G_j."""

    kind = "sim"

    def __init__(self, cfg: ModelConfig, tables: EntityTables):
        super().__init__(cfg, tables)
        self.gsu = SoftSearchGSU(cfg.d, 1, cfg.mlp_hidden[-1])

    def retrieve(self, enc: Encoded, with_aux: bool) -> tuple[Tensor, Tensor | None]:
        return self.gsu(enc, self.cfg.K, with_aux)
