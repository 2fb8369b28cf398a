"""Layers shared by PSU, SEMINAR and the baselines: channels, γ, target attention (paper §3.2-§3.3; docs/design.md,
Model contracts)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seminar_ray.data.entities import EntityTables
from seminar_ray.models.config import ModelConfig

N_ITEM_CHANNELS = 3  # T, I, A


@dataclass
class Channels:
    """Decomposed representation of query-item pairs (paper §3.3.1): x = Σ_m γ_m x^(m) = Σ_m γ_m |x^(m)| x̂^(m)."""

    x: Tensor  # [..., 4, d] channel vectors Q, T, I, A
    gamma: Tensor  # [..., 4] γ = [λ, (1-λ)·w]

    @property
    def fused(self) -> Tensor:
        return (self.gamma.unsqueeze(-1) * self.x).sum(-2)

    @property
    def norms(self) -> Tensor:
        return self.x.norm(dim=-1)

    @property
    def units(self) -> Tensor:
        return F.normalize(self.x, dim=-1)


def masked_mean(values: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of `values` over `dim` counting only positions where `mask` is True (padding excluded)."""
    m = mask.to(values.dtype).unsqueeze(-1)
    return (values * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim with exactly zero weight on masked positions (and all zeros if all are masked)."""
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask.to(scores.dtype)


def masked_topk(scores: Tensor, mask: Tensor, k: int) -> Tensor:
    """Indices [..., k] of the k best real positions; -1 where fewer than k are real (pads are never chosen first)."""
    k = min(k, scores.shape[-1])
    idx = scores.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices
    return idx.masked_fill(~mask.expand_as(scores).gather(-1, idx), -1)


def gather_rows(table: Tensor, idx: Tensor) -> Tensor:
    """table [B, L, ...], idx [B, C, K] (−1 allowed, gives row 0) → [B, C, K, ...] without expanding the table C
    times."""
    b, length = table.shape[:2]
    flat = table.reshape(b * length, -1)
    offsets = (torch.arange(b, device=idx.device) * length).view(b, *([1] * (idx.dim() - 1)))
    return F.embedding(idx.clamp(min=0) + offsets, flat).reshape(*idx.shape, *table.shape[2:])


def is_user_level(batch: dict[str, Tensor]) -> bool:
    """True for a user-level batch (seq_* windows and target_pos), False for a per-target one (hist_*)."""
    return "seq_items" in batch


def num_targets(batch: dict[str, Tensor]) -> int:
    """Training targets in a batch of either form (what a step's samples/s counts)."""
    return int(batch["target_valid"].sum()) if is_user_level(batch) else int(batch["labels"].shape[0])


def history_band(real: Tensor, pos: Tensor, max_len: int) -> Tensor:
    """[B, T, N]: True where column n holds a behaviour in target t's history, the columns [pos_t − L, pos_t).

    real [B, N] marks behaviours (not padding); pos [B, T] is each target's column. Nothing at or after a target's
    own column is ever in its history, which is what makes one pass over a user's window leak-free.
    """
    col = torch.arange(real.shape[1], device=real.device)
    p = pos.unsqueeze(-1)
    return real.unsqueeze(1) & (col >= p - max_len) & (col < p)


def per_candidate(x: Tensor, c: int) -> Tensor:
    """[B, T, ...] → [B, T·C, ...]: a target's value repeated for each of its C candidates (a view when T = 1)."""
    b, t = x.shape[:2]
    return x.unsqueeze(2).expand(b, t, c, *x.shape[2:]).reshape(b, t * c, *x.shape[2:])


def recent_positions(real: Tensor, pos: Tensor, max_len: int, n: int) -> Tensor:
    """[B, T, n] columns of the n most recent behaviours in each target's history; -1 where there are fewer."""
    n = min(n, max_len)
    cols = pos.unsqueeze(-1) - n + torch.arange(n, device=pos.device)  # [B, T, n], within the band by construction
    inside = cols >= 0
    real_at = real.gather(1, cols.clamp(min=0).flatten(1)).view_as(cols)
    return cols.masked_fill(~(inside & real_at), -1)


class MLP(nn.Sequential):
    """Linear-ReLU stack ending in a linear layer of width `out`; in training, `dropout` zeroes each Linear's inputs
    with that probability (the layers and their state-dict names are the same either way)."""

    def __init__(self, d_in: int, hidden: tuple[int, ...], out: int = 1, out_bias: bool = True, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(d_in, h), nn.ReLU()]
            d_in = h
        layers.append(nn.Linear(d_in, out, bias=out_bias))
        super().__init__(*layers)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            if self.dropout and isinstance(layer, nn.Linear):
                x = F.dropout(x, self.dropout, self.training)
            x = layer(x)
        return x


class MultiModalEmbedding(nn.Module):
    """Channels Q, T, I, A and the gate w (paper §3.3.1; docs/design.md, Model contracts); frozen 512-d features are
    buffers, never trained.

    Q = W_q(mean of keyword token embeddings, padding masked, + W_qt(query text_emb) where present)
    T = W_t(text_emb), I = W_i(image_emb), A = W_a(item-ID embedding + mean attribute embedding);
    a learned "missing" vector replaces a channel whose feature is absent.
    """

    # frozen feature tables, registered as buffers in __init__ (rows indexed by entity id)
    item_text: Tensor
    item_text_mask: Tensor
    item_image: Tensor
    item_image_mask: Tensor
    item_attrs: Tensor
    query_tokens: Tensor
    query_text: Tensor
    query_text_mask: Tensor

    def __init__(self, cfg: ModelConfig, tables: EntityTables):
        super().__init__()
        d, f = cfg.d, cfg.feature_dim
        self.lam = cfg.lam
        self.sizes = sizes = table_sizes(tables)  # the checkpoint fingerprint
        if sizes["feature_dim"] != f:
            raise ValueError(f"EntityTables feature width {sizes['feature_dim']} != ModelConfig.feature_dim {f}")
        for name in (
            "item_text",
            "item_text_mask",
            "item_image",
            "item_image_mask",
            "item_attrs",
            "query_tokens",
            "query_text",
            "query_text_mask",
        ):
            # non-persistent: rebuilt from EntityTables at load time, so checkpoints stay small
            self.register_buffer(name, torch.from_numpy(np.array(getattr(tables, name), copy=True)), persistent=False)
        self.item_id = nn.Embedding(sizes["num_items"] + 1, d, padding_idx=0)
        self.attr = nn.Embedding(sizes["num_attrs"] + 1, d, padding_idx=0)
        self.token = nn.Embedding(sizes["num_tokens"] + 1, d, padding_idx=0)
        self.W_qt = nn.Linear(f, d)
        self.W_q = nn.Linear(d, d)
        self.W_t = nn.Linear(f, d)
        self.W_i = nn.Linear(f, d)
        self.W_a = nn.Linear(d, d)
        self.missing = nn.Parameter(torch.randn(3, d) * 0.1)  # Q (no tokens, no text), T, I
        self.gate = MLP(N_ITEM_CHANNELS * d, (cfg.gate_hidden,), N_ITEM_CHANNELS)
        for emb in (self.item_id, self.attr, self.token):
            nn.init.normal_(emb.weight, std=0.1)
            with torch.no_grad():
                emb.weight[0].zero_()
        self._entity_cache: tuple[Tensor, Tensor, Tensor] | None = None  # cache_entities()
        self._table_cache: dict[int, PairTable] = {}  # id(projection) → PairTable over every entity (inference)

    def query_channel(self, query_ids: Tensor) -> Tensor:
        """[..., d]: Q channel of each query id."""
        tokens = self.query_tokens[query_ids]
        has_tok = tokens != 0
        pooled = masked_mean(self.token(tokens), has_tok, dim=-2)
        has_text = self.query_text_mask[query_ids]
        pooled = pooled + self.W_qt(self.query_text[query_ids]) * has_text.unsqueeze(-1)
        present = (has_tok.any(-1) | has_text).unsqueeze(-1)
        return torch.where(present, self.W_q(pooled), self.missing[0])

    def item_channels(self, item_ids: Tensor) -> Tensor:
        """[..., 3, d]: T, I, A channels of each item id."""
        text = torch.where(
            self.item_text_mask[item_ids].unsqueeze(-1), self.W_t(self.item_text[item_ids]), self.missing[1]
        )
        image = torch.where(
            self.item_image_mask[item_ids].unsqueeze(-1), self.W_i(self.item_image[item_ids]), self.missing[2]
        )
        attrs = self.item_attrs[item_ids]
        attr = self.W_a(self.item_id(item_ids) + masked_mean(self.attr(attrs), attrs != 0, dim=-2))
        return torch.stack([text, image, attr], dim=-2)

    def item_weights(self, item_channels: Tensor) -> Tensor:
        """[..., 3]: w = softmax(gate(item's own T, I, A)), so γ depends on the item alone (docs/design.md, Model
        contracts)."""
        return torch.softmax(self.gate(item_channels.flatten(-2)), dim=-1)

    def gamma(self, w: Tensor) -> Tensor:
        """[..., 4]: γ = [λ, (1-λ)·w]."""
        lam = torch.full_like(w[..., :1], self.lam)
        return torch.cat([lam, (1.0 - self.lam) * w], dim=-1)

    def entity_channels(self, query_ids: Tensor, item_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-entity (Q [Uq, d], T/I/A [Ui, 3, d], w [Ui, 3]) for unique id tensors."""
        if self._entity_cache is not None:
            q_all, items_all, w_all = self._entity_cache
            return q_all[query_ids], items_all[item_ids], w_all[item_ids]
        items = self.item_channels(item_ids)
        return self.query_channel(query_ids), items, self.item_weights(items)

    @torch.no_grad()
    def cache_entities(self, chunk: int = 65536) -> None:
        """Inference: compute every query's and item's channels and w once (each depends on its entity alone), so
        a forward pass gathers rows instead of projecting 512-d features; `train()` drops the cache."""

        def rows(fn, n: int) -> Tensor:
            return torch.cat(
                [fn(torch.arange(s, min(s + chunk, n), device=self.item_text.device)) for s in range(0, n, chunk)]
            )

        q_all = rows(self.query_channel, self.query_tokens.shape[0])
        items_all = rows(self.item_channels, self.item_text.shape[0])
        self._entity_cache = (q_all, items_all, self.item_weights(items_all))
        self._table_cache = {}

    def train(self, mode: bool = True) -> MultiModalEmbedding:
        if mode:
            self._entity_cache = None
            self._table_cache = {}
        return super().train(mode)

    def table(
        self, query_ids: list[Tensor], item_ids: list[Tensor], project: ChannelProjection | None = None
    ) -> tuple[PairTable, list[Tensor], list[Tensor]]:
        """Channels of the distinct ids among several id tensors, computed once each, and each tensor's row indices.

        `project` (GSU's G_j) maps the channels after the gate has read them, so w stays the item's own
        (docs/design.md, Model contracts).
        """
        if self._entity_cache is not None:  # inference: a table over every entity, its rows are the ids
            return self._full_table(self._entity_cache, project), list(query_ids), list(item_ids)
        uq, inv_q = torch.unique(torch.cat([q.reshape(-1) for q in query_ids]), return_inverse=True)
        ui, inv_i = torch.unique(torch.cat([i.reshape(-1) for i in item_ids]), return_inverse=True)
        table = self._pair_table(*self.entity_channels(uq, ui), project)
        return table, _split_like(inv_q, query_ids), _split_like(inv_i, item_ids)

    def _pair_table(self, q: Tensor, items: Tensor, w: Tensor, project: ChannelProjection | None) -> PairTable:
        if project is not None:
            q, items = project(q.unsqueeze(-2), slice(0, 1)).squeeze(-2), project(items, slice(1, None))
        return PairTable(query=q, items=items, gamma=self.gamma(w), lam=self.lam)

    @torch.no_grad()
    def _full_table(self, cache: tuple[Tensor, Tensor, Tensor], project: ChannelProjection | None) -> PairTable:
        """The PairTable of every query and item, built once per projection from the entity cache: a serving
        forward pass then gathers rows by id, with no per-batch unique, projection or γ."""
        key = id(project)
        if key not in self._table_cache:
            self._table_cache[key] = self._pair_table(*cache, project)
        return self._table_cache[key]


class EmbeddingModel(nn.Module):
    """What every model starts from: its config and the multi-modal embedding, the part PSU pretrains and the CTR
    models restore by name (`embedding.*`, seminar.py `restore_psu`). Built first, so a model's other layers draw
    their initial weights after it."""

    def __init__(self, cfg: ModelConfig, tables: EntityTables):
        super().__init__()
        self.cfg = cfg
        self.embedding = MultiModalEmbedding(cfg, tables)


@dataclass
class PairTable:
    """Per-entity channels of the distinct ids in a batch; behaviours and targets are row indices into it."""

    query: Tensor  # [Uq, d] Q channel
    items: Tensor  # [Ui, 3, d] T, I, A channels
    gamma: Tensor  # [Ui, 4] γ = [λ, (1-λ)·w] of each item
    lam: float

    def __post_init__(self) -> None:
        self.item_part = (self.gamma[:, 1:].unsqueeze(-1) * self.items).sum(-2)  # Σ_j γ_j x^(j)

    def keys(self, q_rows: Tensor, i_rows: Tensor) -> Tensor:
        """Fused pair vectors Σ_m γ_m x^(m) [..., d], without materialising the channels per behaviour."""
        # F.embedding: its backward is a dense scatter-add, much faster on CPU than advanced indexing's index_put
        return self.lam * F.embedding(q_rows, self.query) + F.embedding(i_rows, self.item_part)

    def channels(self, q_rows: Tensor, i_rows: Tensor) -> Channels:
        x = torch.cat([self.query[q_rows].unsqueeze(-2), self.items[i_rows]], dim=-2)
        return Channels(x=x, gamma=self.gamma[i_rows])


def _split_like(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    parts = flat.split([t.numel() for t in like])
    return [p.reshape(t.shape) for p, t in zip(parts, like)]


class ChannelProjection(nn.Module):
    """GSU's per-channel projections G_j ∈ R^{d×d}, j ∈ {Q, T, I, A} (paper §3.3.2), initialised to the identity."""

    def __init__(self, d: int, n_channels: int = 4):
        super().__init__()
        self.G = nn.Parameter(torch.eye(d).repeat(n_channels, 1, 1))

    def forward(self, x: Tensor, channels: slice = slice(None)) -> Tensor:
        """x [..., m, d] with m = the selected channels → x^(j) G_j."""
        return torch.einsum("...md,mde->...me", x, self.G[channels])


class _DenseAttention(torch.autograd.Function):
    """pooled [B, M, H, d] = Σ_n softmax_n(qh·k_n over `mask`) k_n for head queries qh [B, M, H, d] and keys
    [B, N, d] shared by the M queries of a row; mask [B, M, N] (a view may broadcast). A row with nothing to attend
    pools zeros. Keeps one [B, M, H, N] tensor (the weights) for the backward pass and writes its gradient once:
    the autograd graph of the same ops keeps four and allocates as many gradients."""

    @staticmethod
    def forward(ctx, qh: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        b, m, h, d = qh.shape
        w = torch.bmm(qh.reshape(b, m * h, d), keys.transpose(1, 2)).view(b, m, h, -1)
        w.masked_fill_(~mask.unsqueeze(2), torch.finfo(w.dtype).min)
        w = torch.softmax(w, dim=-1).mul_(mask.unsqueeze(2))
        ctx.save_for_backward(qh, keys, w)
        return torch.bmm(w.view(b, m * h, -1), keys).view(b, m, h, d)

    @staticmethod
    def backward(ctx, g: Tensor):
        qh, keys, w = ctx.saved_tensors
        b, m, h, d = qh.shape
        g = g.contiguous()
        gs = torch.bmm(g.view(b, m * h, d), keys.transpose(1, 2)).view(b, m, h, -1)  # ∂/∂w
        gs.sub_((gs * w).sum(-1, keepdim=True)).mul_(w)  # softmax backward: ∂/∂scores
        g_q = torch.bmm(gs.view(b, m * h, -1), keys).view(b, m, h, d)
        # ∂/∂keys = gsᵀ·qh + wᵀ·g: one GEMM over the stacked pairs
        stacked_w = torch.cat([gs.view(b, m * h, -1), w.view(b, m * h, -1)], dim=1)
        stacked_q = torch.cat([qh.reshape(b, m * h, d), g.view(b, m * h, d)], dim=1)
        return g_q, torch.bmm(stacked_w.transpose(1, 2), stacked_q), None


class _GatheredAttention(torch.autograd.Function):
    """pooled [B, M, H, d] = Σ_k softmax_k(qh·k_idx) k_idx over each query's own rows idx [B, M, K] (-1 = none) of
    keys [B, N, d]: the ESU over the top-K. The [B, M, K, d] gathered rows are rebuilt in the backward pass instead
    of kept, and their gradient is written once and scattered straight into keys' gradient."""

    @staticmethod
    def forward(ctx, qh: Tensor, keys: Tensor, idx: Tensor) -> Tensor:
        sel = gather_rows(keys, idx)  # [B, M, K, d]
        b, m, k, d = sel.shape
        h = qh.shape[2]
        w = torch.bmm(qh.reshape(b * m, h, d), sel.view(b * m, k, d).transpose(1, 2)).view(b, m, h, k)
        valid = (idx >= 0).unsqueeze(2)
        w.masked_fill_(~valid, torch.finfo(w.dtype).min)
        w = torch.softmax(w, dim=-1).mul_(valid)
        ctx.save_for_backward(qh, keys, idx, w)
        return torch.bmm(w.view(b * m, h, k), sel.view(b * m, k, d)).view(b, m, h, d)

    @staticmethod
    def backward(ctx, g: Tensor):
        qh, keys, idx, w = ctx.saved_tensors
        sel = gather_rows(keys, idx)
        b, m, k, d = sel.shape
        h = qh.shape[2]
        g = g.contiguous()
        sel2 = sel.view(b * m, k, d)
        gs = torch.bmm(g.view(b * m, h, d), sel2.transpose(1, 2)).view(b, m, h, k)
        gs.sub_((gs * w).sum(-1, keepdim=True)).mul_(w)
        g_q = torch.bmm(gs.view(b * m, h, k), sel2).view(b, m, h, d)
        # ∂/∂rows = gsᵀ·qh + wᵀ·g, one batched GEMM over the stacked pairs, then scattered into the keys
        stacked_w = torch.cat([gs.view(b * m, h, k), w.view(b * m, h, k)], dim=1)
        stacked_q = torch.cat([qh.reshape(b * m, h, d), g.view(b * m, h, d)], dim=1)
        g_rows = torch.bmm(stacked_w.transpose(1, 2), stacked_q)  # [B·M, K, d]
        n = keys.shape[1]
        flat = (idx.clamp(min=0) + torch.arange(b, device=idx.device).view(b, 1, 1) * n).reshape(-1)
        g_keys = keys.new_zeros(b * n, d).index_add_(0, flat, g_rows.view(-1, d))  # rows of "none" carry zeros
        return g_q, g_keys.view(b, n, d), None


class MultiHeadTargetAttention(nn.Module):
    """Multi-head target attention with a padding mask (paper §3.3.1-§3.3.2); one class, separate weights per unit.

    α_h = (q_t W_h^Q)(k_l W_h^K)^T / √d; head_h = Σ_l softmax(α_h)_l k_l W_h^V; out = Concat(head_h) W^O.
    Fused form: the query side folds W_h^Q (W_h^K)^T, so keys are never projected per head.
    """

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.d, self.heads = d, heads
        self.W_Q = nn.Parameter(torch.randn(heads, d, d) / math.sqrt(d))
        self.W_K = nn.Parameter(torch.randn(heads, d, d) / math.sqrt(d))
        self.W_V = nn.Parameter(torch.randn(heads, d, d) / math.sqrt(d))
        self.W_O = nn.Linear(heads * d, d)

    def head_queries(self, q: Tensor) -> Tensor:
        """[..., d] → [..., H, d]: q W_h^Q (W_h^K)^T / √d, the per-head vector whose inner product with k_l is α_h."""
        return torch.einsum("...d,hde,hfe->...hf", q, self.W_Q, self.W_K) / math.sqrt(self.d)

    def folded_query(self, q: Tensor) -> Tensor:
        """[..., d] → [..., d]: u = mean_h q W_h^Q (W_h^K)^T / √d, so the mean-over-heads score is <u, k_l>
        (docs/design.md, Retrieval)."""
        return self.head_queries(q).mean(-2)

    def scores(self, q: Tensor, keys: Tensor) -> Tensor:
        """Fused α [B, C, H, L] for q [B, C, d] and keys [B, L, d] (shared) or [B, C, L, d] (per candidate)."""
        u = self.head_queries(q)
        if keys.dim() == 3:
            return torch.einsum("bchd,bld->bchl", u, keys)
        return torch.einsum("bchd,bcld->bchl", u, keys)

    def scores_decomposed(self, q: Channels, k: Channels) -> Tensor:
        """α [B, C, H, L] as Σ_ij γ_ij (x̂_t^i W_h^Q)(x̂_l^j W_h^K)^T / √d, γ_ij = γ_i γ_j |x_t^i| |x_l^j| (§3.3.1)."""
        qi = torch.einsum("bcid,hde->bchie", q.units, self.W_Q)
        kj = torch.einsum("blid,hde->bhlie", k.units, self.W_K)
        unit_dots = torch.einsum("bchie,bhlje->bchlij", qi, kj)
        q_w = (q.gamma * q.norms)[:, :, None, None, :, None]  # γ_i |x_t^i|
        k_w = (k.gamma * k.norms)[:, None, None, :, None, :]  # γ_j |x_l^j|
        return (unit_dots * q_w * k_w).sum((-1, -2)) / math.sqrt(self.d)

    def pool(self, weights: Tensor, keys: Tensor) -> Tensor:
        """Σ_l α_hl k_l W_h^V, heads concatenated and mixed by W^O → [B, C, d]."""
        if keys.dim() == 3:
            pooled = torch.einsum("bchl,bld->bchd", weights, keys)
        else:
            pooled = torch.einsum("bchl,bcld->bchd", weights, keys)
        heads = torch.einsum("bchd,hde->bche", pooled, self.W_V)
        return self.W_O(heads.flatten(-2))

    def _out(self, pooled: Tensor) -> Tensor:
        """Per-head pooled keys [B, M, H, d] → W_h^V per head, concatenated, W^O → [B, M, d]."""
        return self.W_O(torch.einsum("bchd,hde->bche", pooled, self.W_V).flatten(-2))

    def attend(self, q: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """out [B, M, d] of queries q [B, M, d] over keys [B, N, d] shared by a row, mask [B, M, N] (fused)."""
        return self._out(_DenseAttention.apply(self.head_queries(q), keys, mask))

    def attend_rows(self, q: Tensor, keys: Tensor, idx: Tensor) -> Tensor:
        """out [B, M, d] of queries q [B, M, d] over their own rows idx [B, M, K] of keys [B, N, d] (-1 = none):
        the same as forward(q, gather_rows(keys, idx), idx >= 0)[0], without keeping the gathered rows."""
        return self._out(_GatheredAttention.apply(self.head_queries(q), keys, idx))

    def forward(self, q: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(out [B, C, d], weights [B, C, H, L]); mask [B, L] or [B, C, L] is True on real behaviours."""
        scores = self.scores(q, keys)
        mask = mask.unsqueeze(1) if mask.dim() == 2 else mask
        weights = masked_softmax(scores, mask.unsqueeze(2))
        return self.pool(weights, keys), weights


def table_sizes(tables: EntityTables) -> dict[str, int]:
    """The fingerprint a model's shapes depend on; a checkpoint stores it and loading checks it."""
    meta = tables.meta
    max_attr = int(tables.item_attrs.max(initial=0))
    max_tok = int(tables.query_tokens.max(initial=0))
    if max_attr > meta.num_attrs or max_tok > meta.num_tokens:
        raise ValueError(
            f"EntityTables ids exceed meta: attr {max_attr} > {meta.num_attrs} or token {max_tok} > {meta.num_tokens}"
        )
    return {
        "num_items": int(tables.item_text.shape[0]) - 1,
        "num_queries": int(tables.query_tokens.shape[0]) - 1,
        "num_attrs": int(meta.num_attrs),
        "num_tokens": int(meta.num_tokens),
        "attr_width": int(tables.item_attrs.shape[1]),
        "token_width": int(tables.query_tokens.shape[1]),
        "feature_dim": int(tables.item_text.shape[1]),
    }
