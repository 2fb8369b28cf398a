"""Pretraining Search Unit: next-pair prediction, chunked multi-modal alignment, query-item relevance (paper §3.3.1)."""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seminar_ray.data.entities import EntityTables
from seminar_ray.models.config import ModelConfig
from seminar_ray.models.layers import MLP, EmbeddingModel, MultiHeadTargetAttention, PairTable

ALIGN_PAIRS = ((0, 1), (0, 2), (1, 2))  # (T, I), (T, A), (I, A) among the item channels


LOSS_NORMS = ("none", "chance")  # ModelConfig.loss_norm


def soft_target_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax cross-entropy of the labelled candidate(s) among the C candidates of each row, mean over rows."""
    log_p = torch.log_softmax(logits, dim=-1)
    return (-(labels * log_p).sum(-1) / labels.sum(-1).clamp(min=1.0)).mean()


def chunk(x: Tensor, n_chunks: int) -> Tensor:
    """[B, L, ...] → [B, N_ch, ceil(L/N_ch), ...], left-padded with zeros so chunks line up with the recent end."""
    b, length = x.shape[:2]
    size = math.ceil(length / n_chunks)
    pad = n_chunks * size - length
    if pad:
        x = torch.cat([x.new_zeros(b, pad, *x.shape[2:]), x], dim=1)
    return x.reshape(b, n_chunks, size, *x.shape[2:])


class _KeptExpSums(torch.autograd.Function):
    """(r, c) [M, S]: row and column sums of K = exp(a·bᵀ) ⊙ distinct ⊙ (v vᵀ), for a, b [M, S, d] (a already divided
    by τ), distinct [M, S, S] and v [M, S] 0/1; the backward pass writes one [M, S, S] gradient and no other."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, distinct: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.bmm(a, b.transpose(1, 2)).exp_().mul_(distinct).mul_(v.unsqueeze(-1)).mul_(v.unsqueeze(-2))
        ctx.save_for_backward(a, b, k)
        return k.sum(-1), k.sum(-2)

    @staticmethod
    def backward(ctx, g_r: Tensor, g_c: Tensor):
        a, b, k = ctx.saved_tensors
        g = (k * g_r.unsqueeze(-1)).addcmul_(k, g_c.unsqueeze(-2))  # ∂/∂(a_i·b_j) = K_ij (g_r_i + g_c_j)
        return torch.bmm(g, b), torch.bmm(g.transpose(1, 2), a), None, None


def clip_loss(
    a: Tensor, b: Tensor, valid: Tensor, distinct: Tensor, temperature: float, by_chance: bool = False
) -> tuple[Tensor, Tensor]:
    """InfoNCE within chunks in both directions, a→b and b→a (sum over real rows, and their count).

    a, b [B, N, S, d] unit vectors (zero or any finite values on rows outside `valid`); valid [B, N, S]; distinct
    [B, N, S, S] 1 where column j may be row i's negative (0 for another behaviour with the same item, 1 on the
    diagonal). Logits are cos / τ; padding and missing features are masked out of rows and columns. Each row's loss
    is L(a→b) + L(b→a): the paper's ordered pairs (i, j) and (j, i) of §3.3.1. With `by_chance`, each direction is
    divided by its value at chance, log(#candidates of the row), and the two are averaged: 1 at chance.

    No logsumexp: a logit is a cosine over τ, so |logit| ≤ 1/τ ≤ 40 (ModelConfig keeps τ ≥ 0.025) and exp(logit)
    can neither overflow nor underflow in float32. One exp then serves both directions' sums, the masks are factors
    applied in place, and the gradient is written once (_KeptExpSums): about a third of the memory passes over
    [B, N, S, S] of a masked copy and two logsumexps, which bench/psu_reference.py keeps (tests check both agree).
    """
    v = valid.to(a.dtype)
    a = a * (1.0 / temperature)
    rows, cols = _KeptExpSums.apply(a.flatten(0, 1), b.flatten(0, 1), distinct.flatten(0, 1), v.flatten(0, 1))
    tiny = torch.finfo(a.dtype).tiny
    diag = (a * b).sum(-1)  # [B, N, S]
    a_to_b = rows.view_as(diag).clamp(min=tiny).log() - diag
    b_to_a = cols.view_as(diag).clamp(min=tiny).log() - diag
    if by_chance:  # candidates of row i: its kept columns, as many as column i's kept rows (the mask is symmetric)
        chance = torch.einsum("bnij,bnj->bni", distinct, v).clamp(min=2).log()
        per_row = 0.5 * (a_to_b + b_to_a) / chance
    else:
        per_row = a_to_b + b_to_a
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum(), v.sum()


def alignment_loss(
    units: Tensor, present: Tensor, item_ids: Tensor, n_chunks: int, temperature: float, by_chance: bool = False
) -> Tensor:
    """L_align = Σ_i Σ_(j≠i) L_CLIP(x̂^(i), x̂^(j)) over the ordered pairs of T, I, A (§3.3.1), within N_ch chunks:
    O(L²/N_ch) memory. Each L_CLIP is a mean over the real rows of all chunks (the paper sums per-chunk means, which
    would scale the loss by N_ch, a memory knob). With `by_chance`, the mean over the pairs of the chance-normalised
    losses: 1 at chance.

    units [B, L, 3, d] unit vectors; present [B, L, 3] True where the behaviour is real and the feature exists.
    """
    units, present, ids = chunk(units, n_chunks), chunk(present, n_chunks), chunk(item_ids, n_chunks)
    size = ids.shape[-1]
    distinct = (ids.unsqueeze(-1) != ids.unsqueeze(-2)) | torch.eye(size, dtype=torch.bool, device=ids.device)
    distinct = distinct.to(units.dtype)  # [B, N, S, S], shared by the three pairs
    # absent features become zero vectors (finite whatever the input); one unbind, so one gradient copy
    channels = (units * present.unsqueeze(-1)).unbind(-2)
    total = units.new_zeros(())
    for i, j in ALIGN_PAIRS:
        valid = present[..., i] & present[..., j]
        loss_sum, n = clip_loss(channels[i], channels[j], valid, distinct, temperature, by_chance)
        total = total + loss_sum / n.clamp(min=1.0)
    return total / len(ALIGN_PAIRS) if by_chance else total


def derangement(n: int, device: torch.device) -> Tensor:
    """A random permutation with no fixed point (a single random cycle), n ≥ 2."""
    order = torch.randperm(n, device=device)
    out = torch.empty_like(order)
    out[order] = order.roll(1)
    return out


class RelevanceHead(nn.Module):
    """Bilinear query-item relevance logit s(q, i) = x^Q W x^item + b, W initialised to the identity (§3.3.1)."""

    def __init__(self, d: int):
        super().__init__()
        self.W = nn.Parameter(torch.eye(d))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, xq: Tensor, xi: Tensor) -> Tensor:
        return torch.einsum("nd,de,ne->n", xq, self.W, xi) + self.b


def relevance_loss(head: RelevanceHead, xq: Tensor, xi: Tensor, neg: Tensor, neg_ok: Tensor) -> Tensor:
    """BCE: the behaviour's own (query, item) pair → 1, the same query with another behaviour's item → 0.

    Minimising it raises matching pairs' logits and lowers shuffled ones (the reference code had the sign reversed).
    """
    pos = F.binary_cross_entropy_with_logits(head(xq, xi), torch.ones_like(xq[:, 0]))
    neg_bce = F.binary_cross_entropy_with_logits(head(xq, xi[neg]), torch.zeros_like(xq[:, 0]), reduction="none")
    return pos + (neg_bce * neg_ok).sum() / neg_ok.sum().clamp(min=1.0)


class PSU(EmbeddingModel):
    """Pretraining Search Unit (paper §3.3.1): target attention of the next pair over the history + <EOS>."""

    kind = "psu"

    def __init__(self, cfg: ModelConfig, tables: EntityTables):
        super().__init__(cfg, tables)
        d = cfg.d
        self.eos = nn.Parameter(torch.randn(4, d) * 0.1)  # <EOS> channels Q, T, I, A appended after the history
        self.attention = MultiHeadTargetAttention(d, cfg.heads)
        self.next_head = MLP(3 * d, cfg.mlp_hidden, out_bias=False)  # softmax over C: a bias cancels
        self.relevance = RelevanceHead(d)

    def _encode(self, batch: dict[str, Tensor]) -> tuple[PairTable, list[Tensor], list[Tensor]]:
        return self.embedding.table(
            [batch["hist_queries"], batch["target_queries"]], [batch["hist_items"], batch["target_items"]]
        )

    def _eos_key(self) -> Tensor:
        w = self.embedding.item_weights(self.eos[1:])
        return (self.embedding.gamma(w).unsqueeze(-1) * self.eos).sum(0)

    def _next_logits(self, table: PairTable, q_rows: list[Tensor], i_rows: list[Tensor], hist_items: Tensor) -> Tensor:
        keys = table.keys(q_rows[0], i_rows[0])
        b = keys.shape[0]
        keys = torch.cat([keys, self._eos_key().expand(b, 1, -1)], dim=1)
        mask = torch.cat([hist_items != 0, hist_items.new_ones(b, 1, dtype=torch.bool)], dim=1)
        target = table.keys(q_rows[1], i_rows[1])
        out, _ = self.attention(target, keys, mask)
        return self.next_head(torch.cat([out, target, out * target], dim=-1)).squeeze(-1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Next-pair logits [B, C] (candidate 0 is the true next pair)."""
        table, q_rows, i_rows = self._encode(batch)
        return self._next_logits(table, q_rows, i_rows, batch["hist_items"])

    def _alignment_inputs(self, table: PairTable, i_rows: Tensor, hist_items: Tensor) -> tuple[Tensor, Tensor]:
        """(units [B, L, 3, d]: each behaviour's T, I, A vectors normalised; present [B, L, 3]: real and existing)."""
        e = self.embedding
        units = F.embedding(i_rows, F.normalize(table.items, dim=-1).flatten(1)).unflatten(-1, table.items.shape[1:])
        present = torch.stack(
            [
                e.item_text_mask[hist_items],
                e.item_image_mask[hist_items],
                torch.ones_like(hist_items, dtype=torch.bool),
            ],
            dim=-1,
        ) & (hist_items != 0).unsqueeze(-1)
        return units, present

    def _alignment(self, table: PairTable, i_rows: Tensor, hist_items: Tensor) -> Tensor:
        units, present = self._alignment_inputs(table, i_rows, hist_items)
        cfg = self.cfg
        return alignment_loss(
            units, present, hist_items, cfg.n_chunks, cfg.temperature, by_chance=cfg.loss_norm == "chance"
        )

    def _relevance(self, table: PairTable, q_rows: Tensor, i_rows: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Over behaviours with a non-empty query only; negatives keep the query and take another behaviour's item."""
        real = (batch["hist_queries"] != 0) & (batch["hist_items"] != 0)
        if int(real.sum()) < 2:
            return table.query.new_zeros(())
        xq, xi = table.query[q_rows[real]], table.item_part[i_rows[real]]
        items = batch["hist_items"][real]
        neg = derangement(len(items), items.device)
        return relevance_loss(self.relevance, xq, xi, neg, (items[neg] != items).float())

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """L_PSU = w_next·L_next + w_align·L_align + w_rel·L_rel, each switchable (paper Table 3 ablation).

        loss_norm "none" is the paper's sum. "chance" divides each task by its value at chance (log C for next-pair,
        log of the candidates per row for each InfoNCE, 2·log 2 for the relevance BCE pair), so each starts near 1
        and none dominates by its scale alone.
        """
        cfg = self.cfg
        by_chance = cfg.loss_norm == "chance"
        table, q_rows, i_rows = self._encode(batch)
        terms: dict[str, Tensor] = {}
        if cfg.use_next:
            logits = self._next_logits(table, q_rows, i_rows, batch["hist_items"])
            scale = math.log(max(logits.shape[-1], 2)) if by_chance else 1.0
            terms["next"] = cfg.w_next * soft_target_ce(logits, batch["labels"]) / scale
        if cfg.use_align:
            terms["align"] = cfg.w_align * self._alignment(table, i_rows[0], batch["hist_items"])
        if cfg.use_rel:
            scale = 2.0 * math.log(2.0) if by_chance else 1.0
            terms["rel"] = cfg.w_rel * self._relevance(table, q_rows[0], i_rows[0], batch) / scale
        if not terms:
            raise ValueError("PSU: use_next, use_align and use_rel are all False; nothing to train")
        total = functools.reduce(operator.add, terms.values())
        return total, {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(total.detach())}
