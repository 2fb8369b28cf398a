"""DIN baseline: target attention over the most recent `din_recent` behaviours only (Zhou et al. 2018)."""

from __future__ import annotations

from torch import Tensor

from seminar_ray.models.base import Encoded, LifelongCTR


class DIN(LifelongCTR):
    """No lifelong retrieval: the ESU attends over the last `din_recent` positions of the left-padded history."""

    kind = "din"

    def retrieve(self, enc: Encoded, with_aux: bool) -> tuple[Tensor, None]:
        return enc.recent_positions(self.cfg.din_recent), None
