"""The PSU as it was before the alignment loss was profiled: the reference that bench/model_speed.py times the PSU
against on the same batches, and that tests/test_models.py checks the PSU's losses and gradients against.

Only the alignment loss differs: here each direction of each InfoNCE is a logsumexp over a masked copy of the
[B, N, S, S] logits, which the profile at L = 2,000 showed to be most of a PSU step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seminar_ray.models.psu import ALIGN_PAIRS, PSU, PairTable, Sequences, chunk


def reference_clip_loss(
    a: Tensor, b: Tensor, valid: Tensor, distinct: Tensor, temperature: float, by_chance: bool = False
) -> tuple[Tensor, Tensor]:
    """InfoNCE within chunks, a→b plus b→a per real row, by masked logsumexp (sum over rows, and their count)."""
    logits = torch.einsum("bnid,bnjd->bnij", a * (1.0 / temperature), b)
    keep = valid.unsqueeze(-1) & valid.unsqueeze(-2) & distinct
    masked = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    diag = torch.diagonal(logits, dim1=-2, dim2=-1)
    a_to_b = torch.logsumexp(masked, dim=-1) - diag
    b_to_a = torch.logsumexp(masked, dim=-2) - diag
    if by_chance:
        chance = (keep.sum(-1).clamp(min=2).log(), keep.sum(-2).clamp(min=2).log())
        per_row = 0.5 * (a_to_b / chance[0].to(a_to_b.dtype) + b_to_a / chance[1].to(b_to_a.dtype))
    else:
        per_row = a_to_b + b_to_a
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum(), valid.sum().to(logits.dtype)


def reference_alignment_loss(
    units: Tensor, present: Tensor, item_ids: Tensor, n_chunks: int, temperature: float, by_chance: bool = False
) -> Tensor:
    """L_align over the ordered pairs of T, I, A within N_ch chunks (seminar_ray.models.psu.alignment_loss)."""
    units, present, ids = chunk(units, n_chunks), chunk(present, n_chunks), chunk(item_ids, n_chunks)
    size = ids.shape[-1]
    distinct = (ids.unsqueeze(-1) != ids.unsqueeze(-2)) | torch.eye(size, dtype=torch.bool, device=ids.device)
    total = units.new_zeros(())
    for i, j in ALIGN_PAIRS:
        valid = present[..., i] & present[..., j]
        loss_sum, n = reference_clip_loss(units[..., i, :], units[..., j, :], valid, distinct, temperature, by_chance)
        total = total + loss_sum / n.clamp(min=1.0)
    return total / len(ALIGN_PAIRS) if by_chance else total


class ReferencePSU(PSU):
    """PSU with the reference alignment loss; parameters, batches and every other term are the PSU's own."""

    def _alignment(self, table: PairTable, i_rows: Tensor, seq: Sequences) -> Tensor:
        units, present = self._alignment_inputs(table, i_rows, seq)
        cfg = self.cfg
        return reference_alignment_loss(
            units, present, seq.items, cfg.n_chunks, cfg.temperature, by_chance=cfg.loss_norm == "chance"
        )
