"""The two-stage lifelong CTR skeleton every CTR model shares: retrieve top-K, ESU over the K, MLP (paper §3.3.2)."""

from __future__ import annotations

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
    masked_mean,
    masked_softmax,
    masked_topk,
)

PAIR_KEYS = ("hist_queries", "hist_items", "target_queries", "target_items")  # the batch's (query, item) id tensors


@dataclass
class Encoded:
    """A batch's history encoded once (keys [B, L, d]) and its C targets ([B, C, d] and channels [B, C, 4, d])."""

    keys: Tensor
    mask: Tensor  # [B, L] True on real behaviours
    target: Tensor
    target_channels: Tensor


class LifelongCTR(EmbeddingModel):
    """Two-stage CTR model: `retrieve` picks top-K history positions per target, ESU attends over them, MLP scores.

    Subclasses define `retrieve`; everything else (inputs, ESU, MLP, loss, serving entry) is shared.
    """

    kind = "ctr"

    def __init__(self, cfg: ModelConfig, tables: EntityTables):
        super().__init__(cfg, tables)
        d = cfg.d
        self.esu = MultiHeadTargetAttention(d, cfg.heads)
        # MLP input: [lifelong-sequence vector, target pair vector, recent-history vector, target channels Q,T,I,A]
        self.mlp = MLP(7 * d, cfg.mlp_hidden)

    def projection(self) -> ChannelProjection | None:
        """Per-channel projection applied to the embedding before fusing (SEMINAR's G_j); None for the baselines."""
        return None

    def encode(
        self, *, hist_queries: Tensor, hist_items: Tensor, target_queries: Tensor, target_items: Tensor
    ) -> Encoded:
        """The history keys and the targets, each distinct entity's channels computed once. Keyword-only: the four
        are id tensors of one dtype, so a swap would raise nothing."""
        table, (hq, tq), (hi, ti) = self.embedding.table(
            [hist_queries, target_queries], [hist_items, target_items], self.projection()
        )
        return Encoded(
            keys=table.keys(hq, hi),
            mask=hist_items != 0,
            target=table.keys(tq, ti),
            target_channels=table.channels(tq, ti).x,
        )

    def encode_batch(self, batch: dict[str, Tensor]) -> Encoded:
        """`encode` of a batch in the batch contract (models/__init__.py)."""
        return self.encode(**{key: batch[key] for key in PAIR_KEYS})

    def retrieve(self, enc: Encoded, with_aux: bool) -> tuple[Tensor, Tensor | None]:
        """(top-K history positions [B, C, K] with -1 for "none", auxiliary logits [B, C] or None)."""
        raise NotImplementedError

    def head(self, enc: Encoded, topk_idx: Tensor) -> Tensor:
        """ESU multi-head target attention over the selected behaviours, then the MLP → click logits [B, C]."""
        selected = gather_rows(enc.keys, topk_idx)
        lifelong, _ = self.esu(enc.target, selected, topk_idx >= 0)
        n = min(self.cfg.recent_len, enc.keys.shape[1])
        recent = masked_mean(enc.keys[:, -n:], enc.mask[:, -n:], dim=1).unsqueeze(1).expand_as(enc.target)
        features = torch.cat([lifelong, enc.target, recent, enc.target_channels.flatten(-2)], dim=-1)
        return self.mlp(features).squeeze(-1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Click logits [B, C]."""
        enc = self.encode_batch(batch)
        idx, _ = self.retrieve(enc, with_aux=False)
        return self.head(enc, idx)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """BCE over the [B, C] labels, plus β·L_GSU where the retrieval has an auxiliary loss (docs/design.md, Model
        contracts)."""
        enc = self.encode_batch(batch)
        idx, aux = self.retrieve(enc, with_aux=True)
        labels = batch["labels"].to(enc.keys.dtype)
        ctr = F.binary_cross_entropy_with_logits(self.head(enc, idx), labels)
        parts = {"ctr": float(ctr.detach())}
        total = ctr
        if aux is not None:
            gsu = F.binary_cross_entropy_with_logits(aux, labels)
            total = ctr + self.cfg.beta_gsu * gsu
            parts["gsu"] = float(gsu.detach())
        parts["loss"] = float(total.detach())
        return total, parts

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
        scores = self.attention.scores(enc.target, enc.keys)
        mask = enc.mask.unsqueeze(1)
        idx = masked_topk(scores.detach().mean(2), mask, k)
        if not with_aux:
            return idx, None
        pooled = self.attention.pool(masked_softmax(scores, mask.unsqueeze(2)), enc.keys)
        aux = self.aux_head(torch.cat([pooled, enc.target, pooled * enc.target], dim=-1)).squeeze(-1)
        return idx, aux
