"""Pretraining Search Unit: next-pair prediction, chunked multi-modal alignment, query-item relevance (paper §3.3.1)."""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seminar_ray.data.entities import EntityTables
from seminar_ray.models.config import ModelConfig
from seminar_ray.models.layers import (
    MLP,
    EmbeddingModel,
    MultiHeadTargetAttention,
    PairTable,
    history_band,
    is_user_level,
    per_candidate,
)

ALIGN_PAIRS = ((0, 1), (0, 2), (1, 2))  # (T, I), (T, A), (I, A) among the item channels


LOSS_NORMS = ("none", "chance")  # ModelConfig.loss_norm


def soft_target_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax cross-entropy of the labelled candidate(s) among the C candidates of each row, mean over rows."""
    log_p = torch.log_softmax(logits, dim=-1)
    return (-(labels * log_p).sum(-1) / labels.sum(-1).clamp(min=1.0)).mean()


def chunk(x: Tensor, n_chunks: int, size: int | None = None) -> Tensor:
    """[B, L, ...] → [B, n, S, ...] with S = `size` or ceil(L/n_chunks) and n = ceil(L/S), left-padded with zeros so
    chunks line up with the recent end."""
    b, length = x.shape[:2]
    size = size or math.ceil(length / n_chunks)
    n = max(math.ceil(length / size), 1)
    pad = n * size - length
    if pad:
        x = torch.cat([x.new_zeros(b, pad, *x.shape[2:]), x], dim=1)
    return x.reshape(b, n, size, *x.shape[2:])


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
    units: Tensor,
    present: Tensor,
    item_ids: Tensor,
    n_chunks: int,
    temperature: float,
    by_chance: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """L_align = Σ_i Σ_(j≠i) L_CLIP(x̂^(i), x̂^(j)) over the ordered pairs of T, I, A (§3.3.1), within N_ch chunks:
    O(L²/N_ch) memory. Each L_CLIP is a mean over the real rows of all chunks (the paper sums per-chunk means, which
    would scale the loss by N_ch, a memory knob). With `by_chance`, the mean over the pairs of the chance-normalised
    losses: 1 at chance.

    units [B, L, 3, d] unit vectors; present [B, L, 3] True where the behaviour is real and the feature exists;
    `chunk_size` fixes the chunks' length instead (a user-level window longer than L keeps the chunks of L).
    """
    units, present, ids = (chunk(x, n_chunks, chunk_size) for x in (units, present, item_ids))
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


@dataclass
class Sequences:
    """A PSU batch of either form (models/__init__.py): behaviours [B, N]; each target's column pos [B, T], its
    history the columns [pos − L, pos); the valid targets [B, T]; and the behaviours this batch trains alignment and
    relevance on (`owned` [B, N]).

    Per-target batch: a row is one target's history, every behaviour of it owned, so a behaviour is aligned once
    for every sampled target whose history holds it. User-level batch: a behaviour is owned by the target right
    after it, so with every training position each behaviour is aligned once per epoch.
    """

    queries: Tensor
    items: Tensor
    pos: Tensor
    valid: Tensor
    owned: Tensor
    max_len: int
    user_level: bool

    @classmethod
    def of(cls, batch: dict[str, Tensor], max_len: int) -> Sequences:
        if not is_user_level(batch):
            items = batch["hist_items"]
            b, n = items.shape
            ones = torch.ones(b, 1, dtype=torch.bool, device=items.device)
            return cls(batch["hist_queries"], items, items.new_full((b, 1), n), ones, items != 0, n, False)
        items, pos, valid = batch["seq_items"], batch["target_pos"], batch["target_valid"]
        owned = torch.zeros_like(items).scatter_add_(1, (pos - 1).clamp(min=0), valid.to(items.dtype)) > 0
        return cls(batch["seq_queries"], items, pos, valid, owned & (items != 0), max_len, True)


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

    def _encode(self, batch: dict[str, Tensor]) -> tuple[Sequences, PairTable, list[Tensor], list[Tensor]]:
        seq = Sequences.of(batch, self.cfg.max_len)
        targets = (
            batch["target_queries"].reshape(len(seq.items), -1),
            batch["target_items"].reshape(len(seq.items), -1),
        )
        table, q_rows, i_rows = self.embedding.table([seq.queries, targets[0]], [seq.items, targets[1]])
        return seq, table, q_rows, i_rows

    def _eos_key(self) -> Tensor:
        w = self.embedding.item_weights(self.eos[1:])
        return (self.embedding.gamma(w).unsqueeze(-1) * self.eos).sum(0)

    def _next_logits(self, seq: Sequences, table: PairTable, q_rows: list[Tensor], i_rows: list[Tensor]) -> Tensor:
        """[B, T, C]: each target attends over its own history ∪ <EOS> (`history_band`), nothing at or after it."""
        keys = table.keys(q_rows[0], i_rows[0])
        b, t = seq.pos.shape
        keys = torch.cat([keys, self._eos_key().expand(b, 1, -1)], dim=1)
        band = history_band(seq.items != 0, seq.pos, seq.max_len)
        band = torch.cat([band, band.new_ones(b, t, 1)], dim=-1)  # <EOS>, the last column, is always attended
        target = table.keys(q_rows[1], i_rows[1])  # [B, T·C, d]
        out = self.attention.attend(target, keys, per_candidate(band, target.shape[1] // t))
        return self.next_head(torch.cat([out, target, out * target], dim=-1)).view(b, t, -1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Next-pair logits shaped like target_items, [B, C] or [R, T, C] (candidate 0 is the true next pair)."""
        seq, table, q_rows, i_rows = self._encode(batch)
        return self._next_logits(seq, table, q_rows, i_rows).view_as(batch["target_items"])

    def _alignment_inputs(self, table: PairTable, i_rows: Tensor, seq: Sequences) -> tuple[Tensor, Tensor]:
        """(units [B, N, 3, d]: each behaviour's T, I, A vectors normalised; present [B, N, 3]: owned and existing)."""
        e, items = self.embedding, seq.items
        units = F.embedding(i_rows, F.normalize(table.items, dim=-1).flatten(1)).unflatten(-1, table.items.shape[1:])
        present = torch.stack(
            [e.item_text_mask[items], e.item_image_mask[items], torch.ones_like(items, dtype=torch.bool)], dim=-1
        ) & seq.owned.unsqueeze(-1)
        return units, present

    def _alignment(self, table: PairTable, i_rows: Tensor, seq: Sequences) -> Tensor:
        units, present = self._alignment_inputs(table, i_rows, seq)
        cfg = self.cfg
        size = math.ceil(seq.max_len / cfg.n_chunks) if seq.user_level else None
        return alignment_loss(
            units, present, seq.items, cfg.n_chunks, cfg.temperature, cfg.loss_norm == "chance", chunk_size=size
        )

    def _relevance(self, table: PairTable, q_rows: Tensor, i_rows: Tensor, seq: Sequences) -> Tensor:
        """Over owned behaviours with a non-empty query only; negatives keep the query and take another behaviour's
        item."""
        real = (seq.queries != 0) & seq.owned
        if int(real.sum()) < 2:
            return table.query.new_zeros(())
        xq, xi = table.query[q_rows[real]], table.item_part[i_rows[real]]
        items = seq.items[real]
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
        seq, table, q_rows, i_rows = self._encode(batch)
        terms: dict[str, Tensor] = {}
        if cfg.use_next:
            logits = self._next_logits(seq, table, q_rows, i_rows)[seq.valid]  # [targets, C]
            labels = batch["labels"].reshape(*seq.valid.shape, -1)[seq.valid]
            scale = math.log(max(logits.shape[-1], 2)) if by_chance else 1.0
            terms["next"] = cfg.w_next * soft_target_ce(logits, labels) / scale
        if cfg.use_align:
            terms["align"] = cfg.w_align * self._alignment(table, i_rows[0], seq)
        if cfg.use_rel:
            scale = 2.0 * math.log(2.0) if by_chance else 1.0
            terms["rel"] = cfg.w_rel * self._relevance(table, q_rows[0], i_rows[0], seq) / scale
        if not terms:
            raise ValueError("PSU: use_next, use_align and use_rel are all False; nothing to train")
        total = functools.reduce(operator.add, terms.values())
        return total, {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(total.detach())}
