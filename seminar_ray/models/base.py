"""The two-stage lifelong CTR skeleton every CTR model shares: retrieve top-K, ESU over the K, MLP (paper §3.3.2)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seminar_ray.data.entities import EntityTables
from seminar_ray.models.config import ModelConfig
from seminar_ray.models.layers import (
    MLP,
    ChannelProjection,
    EmbeddingModel,
    MultiHeadTargetAttention,
    gather_rows,
    history_band,
    is_user_level,
    masked_mean,
    masked_topk,
    per_candidate,
    recent_positions,
)

PAIR_KEYS = ("hist_queries", "hist_items", "target_queries", "target_items")  # the per-target batch's id tensors
USER_KEYS = ("seq_queries", "seq_items", "target_queries", "target_items")  # the user-level batch's id tensors


@dataclass
class Encoded:
    """Behaviours encoded once, keys [B, N, d], and T targets of C candidates each, flattened to [B, T·C, ...].

    Per-target batch: a row is one target's own history (N = L columns, T = 1, pos = L). User-level batch: a row is
    a window of one user's behaviours and T of that user's targets, target t's history the columns
    [pos_t − L, pos_t) (`history_band`). Retrieval, ESU and MLP read the history only through `mask` and
    `recent`, so one implementation serves both forms.
    """

    keys: Tensor  # [B, N, d]
    real: Tensor  # [B, N] True on real behaviours
    pos: Tensor  # [B, T] each target's column: its history ends just before it
    max_len: int  # L
    target: Tensor  # [B, T·C, d]
    target_channels: Tensor  # [B, T·C, 4, d]

    @property
    def n_candidates(self) -> int:
        return self.target.shape[1] // self.pos.shape[1]

    @functools.cached_property
    def mask(self) -> Tensor:
        """[B, T·C, N]: True where a column is in the candidate's target's history."""
        return per_candidate(history_band(self.real, self.pos, self.max_len), self.n_candidates)

    def recent_positions(self, n: int) -> Tensor:
        """[B, T·C, n] columns of the n most recent behaviours before each candidate's target; -1 for none."""
        return per_candidate(recent_positions(self.real, self.pos, self.max_len, n), self.n_candidates)

    def recent(self, n: int) -> Tensor:
        """[B, T·C, d]: mean key of the n most recent behaviours before each target (the "other features")."""
        idx = recent_positions(self.real, self.pos, self.max_len, n)  # [B, T, n]
        return per_candidate(masked_mean(gather_rows(self.keys, idx), idx >= 0, dim=2), self.n_candidates)


class LifelongCTR(EmbeddingModel):
    """Two-stage CTR model: `retrieve` picks top-K history positions per target, ESU attends over them, MLP scores.

    Subclasses define `retrieve`; everything else (inputs, ESU, MLP, loss, serving entry) is shared. Both batch forms
    (per-target and user-level, models/__init__.py) run through the same code: only `encode_batch` tells them apart.
    """

    kind = "ctr"

    def __init__(self, cfg: ModelConfig, tables: EntityTables):
        super().__init__(cfg, tables)
        d = cfg.d
        self.esu = MultiHeadTargetAttention(d, cfg.heads)
        # MLP input: [lifelong-sequence vector, target pair vector, recent-history vector, target channels Q,T,I,A]
        # and, with target_products, [target ⊙ lifelong, target ⊙ recent]
        self.mlp = MLP((9 if cfg.target_products else 7) * d, cfg.mlp_hidden, dropout=cfg.dropout)

    def projection(self) -> ChannelProjection | None:
        """Per-channel projection applied to the embedding before fusing (SEMINAR's G_j); None for the baselines."""
        return None

    def encode(
        self,
        *,
        hist_queries: Tensor,
        hist_items: Tensor,
        target_queries: Tensor,
        target_items: Tensor,
        target_pos: Tensor | None = None,
    ) -> Encoded:
        """The behaviours' keys and the targets, each distinct entity's channels computed once. Keyword-only: the four
        are id tensors of one dtype, so a swap would raise nothing.

        hist_* [B, N]: a per-target history (target_pos None: every target of the row sees all N columns) or a
        user's window with target_pos [B, T]; target_* [B, C] or [B, T, C].
        """
        b, n = hist_items.shape
        pos = hist_items.new_full((b, 1), n) if target_pos is None else target_pos
        tq, ti = target_queries.reshape(b, -1), target_items.reshape(b, -1)
        table, (hq, tq), (hi, ti) = self.embedding.table([hist_queries, tq], [hist_items, ti], self.projection())
        return Encoded(
            keys=F.dropout(table.keys(hq, hi), self.cfg.emb_dropout, self.training),
            real=hist_items != 0,
            pos=pos,
            max_len=self.cfg.max_len if target_pos is not None else n,
            target=table.keys(tq, ti),
            target_channels=table.channels(tq, ti).x,
        )

    def encode_batch(self, batch: dict[str, Tensor]) -> Encoded:
        """`encode` of a batch of either form (models/__init__.py)."""
        if is_user_level(batch):
            return self.encode(**dict(zip(PAIR_KEYS, (batch[k] for k in USER_KEYS))), target_pos=batch["target_pos"])
        return self.encode(**{key: batch[key] for key in PAIR_KEYS})

    def retrieve(self, enc: Encoded, with_aux: bool) -> tuple[Tensor, Tensor | None]:
        """(top-K columns [B, T·C, K] with -1 for "none", auxiliary logits [B, T·C] or None), each candidate's
        columns within its target's history (`enc.mask`)."""
        raise NotImplementedError

    def head(self, enc: Encoded, topk_idx: Tensor) -> Tensor:
        """ESU multi-head target attention over the selected behaviours, then the MLP → click logits [B, T·C]."""
        lifelong = self.esu.attend_rows(enc.target, enc.keys, topk_idx)
        recent = enc.recent(self.cfg.recent_len)
        parts = [lifelong, enc.target, recent, enc.target_channels.flatten(-2)]
        if self.cfg.target_products:
            parts += [enc.target * lifelong, enc.target * recent]
        features = torch.cat(parts, dim=-1)
        return self.mlp(features).squeeze(-1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Click logits shaped like the batch's labels: [B, C], or [R, T, C] for a user-level batch."""
        enc = self.encode_batch(batch)
        idx, _ = self.retrieve(enc, with_aux=False)
        return self.head(enc, idx).view_as(batch["target_items"])

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """The click loss (`ctr_loss`) over the batch's (valid) targets, plus β·L_GSU where the retrieval has an
        auxiliary loss (docs/design.md, Model contracts). Both batch forms give the same mean over the same targets."""
        enc = self.encode_batch(batch)
        idx, aux = self.retrieve(enc, with_aux=True)
        keep = _valid_candidates(batch)
        labels = batch["labels"].to(enc.keys.dtype).reshape(keep.shape)
        c = batch["labels"].shape[-1]
        ctr = self.click_loss(self.head(enc, idx), labels, keep, c)
        parts = {"ctr": float(ctr.detach())}
        total = ctr
        if aux is not None:
            gsu = self.click_loss(aux, labels, keep, c)
            total = ctr + self.cfg.beta_gsu * gsu
            parts["gsu"] = float(gsu.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    def click_loss(self, logits: Tensor, labels: Tensor, keep: Tensor, c: int) -> Tensor:
        """Mean loss of the kept candidates' logits [B, T·C] against their labels [B, T·C], C candidates a target: BCE
        per candidate, or ("softmax") cross-entropy over each target's C, its positive against its own negatives."""
        if self.cfg.ctr_loss == "bce":
            return F.binary_cross_entropy_with_logits(logits[keep], labels[keep])
        rows = keep.reshape(-1, c)[:, 0]  # [B·T] a target's candidates are all kept or all not
        return F.cross_entropy(logits.reshape(-1, c)[rows], labels.reshape(-1, c)[rows])

    def score_with_topk(
        self,
        *,
        hist_queries: Tensor,
        hist_items: Tensor,
        topk_idx: Tensor,
        target_queries: Tensor,
        target_items: Tensor,
    ) -> Tensor:
        """Serving entry: ESU + MLP given precomputed top-K positions [B, C, K] into the L history columns (-1 =
        none). Keyword-only, like `encode`."""
        if topk_idx.shape[:2] != target_items.shape:
            raise ValueError(
                f"topk_idx {tuple(topk_idx.shape)} must be [B, C, K] with [B, C] = {tuple(target_items.shape)}"
            )
        if topk_idx.numel() and int(topk_idx.max()) >= hist_items.shape[1]:
            raise ValueError(f"topk_idx has a position >= L = {hist_items.shape[1]}")
        enc = self.encode(
            hist_queries=hist_queries, hist_items=hist_items, target_queries=target_queries, target_items=target_items
        )
        return self.head(enc, topk_idx)


def _valid_candidates(batch: dict[str, Tensor]) -> Tensor:
    """[B, T·C] True on the candidates of real targets (a user-level batch pads rows with invalid targets)."""
    labels = batch["labels"]
    if not is_user_level(batch):
        return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    return per_candidate(batch["target_valid"], labels.shape[-1])


class SoftSearchGSU(nn.Module):
    """GSU by target attention: top-K by the mean over heads of α_h; learns through a soft-attention auxiliary loss.

    The auxiliary logit reads the soft-attention pooled vector over all L (SIM-style L = L_ESU + β·L_GSU;
    docs/design.md, Model contracts),
    so W^Q, W^K, W^V of the GSU receive gradients although top-K itself is not differentiable.
    """

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.attention = MultiHeadTargetAttention(d, heads)
        self.aux_head = MLP(3 * d, (hidden,))

    def forward(self, enc: Encoded, k: int, with_aux: bool) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():  # top-K by mean_h α_h = <u, k> with u the folded query (one GEMM, not H)
            u = self.attention.folded_query(enc.target)
            idx = masked_topk(torch.einsum("bmd,bnd->bmn", u, enc.keys), enc.mask, k)
        if not with_aux:
            return idx, None
        pooled = self.attention.attend(enc.target, enc.keys, enc.mask)
        aux = self.aux_head(torch.cat([pooled, enc.target, pooled * enc.target], dim=-1)).squeeze(-1)
        return idx, aux
