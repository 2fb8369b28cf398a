"""SEMINAR's CTR model: PSU-restored embeddings, G_j, multi-head GSU top-K, ESU and MLP (paper §3.3.2)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from seminar_ray.data.entities import EntityTables
from seminar_ray.models.base import Encoded, LifelongCTR, SoftSearchGSU
from seminar_ray.models.config import ModelConfig
from seminar_ray.models.layers import ChannelProjection
from seminar_ray.retrieval.tables import GSUTables

EMBEDDING_PREFIX = "embedding."


class SeminarCTR(LifelongCTR):
    """GSU: x^GSU(j) = x^PSU(j) G_j, top-K by mean_h α_h^GSU; ESU: per-head attention over the K (paper §3.3.2)."""

    kind = "seminar"

    def __init__(self, cfg: ModelConfig, tables: EntityTables):
        super().__init__(cfg, tables)
        self.G = ChannelProjection(cfg.d)
        self.gsu = SoftSearchGSU(cfg.d, cfg.heads, cfg.mlp_hidden[-1])

    def projection(self) -> ChannelProjection:
        return self.G

    def retrieve(self, enc: Encoded, with_aux: bool) -> tuple[Tensor, Tensor | None]:
        return self.gsu(enc, self.cfg.K, with_aux)

    def load_pretrained(self, psu_state: Mapping[str, Tensor]) -> None:
        """Restore PSU's embedding tables by name (every `embedding.*` tensor); any missing key or shape differs →
        error."""
        restore_psu(self, psu_state)

    def gsu_target_vectors(self, *, target_queries: Tensor, target_items: Tensor) -> Tensor:
        """u [..., d] with <u, k_l> = mean over heads of α_h^GSU, k_l = GSUTables.keys(...)[l] (docs/design.md,
        Retrieval). Keyword-only: both are id tensors of one dtype, so a swap would raise nothing."""
        table, (tq,), (ti,) = self.embedding.table([target_queries], [target_items], self.G)
        return self.gsu.attention.folded_query(table.keys(tq, ti))

    def gsu_scores(self, batch: dict[str, Tensor]) -> Tensor:
        """The GSU's own mean-over-heads scores [B, C, L], what top-K ranks."""
        enc = self.encode_batch(batch)
        return self.gsu.attention.scores(enc.target, enc.keys).mean(2)


def restore_psu(model: SeminarCTR, psu_state: Mapping[str, Tensor]) -> None:
    """Copy PSU's `embedding.*` tensors into the CTR model's embedding exactly; raise naming the first bad key."""
    own = model.embedding.state_dict()
    for name, tensor in own.items():
        key = EMBEDDING_PREFIX + name
        if key not in psu_state:
            raise KeyError(f"PSU state has no '{key}': not a PSU checkpoint of this model version?")
        if tuple(psu_state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"PSU '{key}' has shape {tuple(psu_state[key].shape)}, the CTR model needs "
                f"{tuple(tensor.shape)}: pretrained on other data or another d?"
            )
    model.embedding.load_state_dict({n: psu_state[EMBEDDING_PREFIX + n] for n in own}, strict=True)


@torch.no_grad()
def gsu_target_tables(model: SeminarCTR) -> tuple[np.ndarray, np.ndarray]:
    """(queries [Q+1, d], items [N+1, d]) with gsu_target_vectors(q, i) = queries[q] + items[i] (docs/design.md,
    Retrieval).

    u = folded_query(k) is linear in the key k = λ·x^Q_q + Σ_j γ_ij x^(j)_i, whose two parts each depend on one entity.
    """
    tables, fold = export_gsu_tables(model), model.gsu.attention.folded_query
    return (
        fold(torch.from_numpy(tables.query_folded().copy())).numpy(),
        fold(torch.from_numpy(tables.item_folded().copy())).numpy(),
    )


@torch.no_grad()
def export_gsu_tables(model: SeminarCTR, chunk: int = 65536) -> GSUTables:
    """Every item's and query's GSU-space channels and γ (rows indexed by id) for the PQ retriever (docs/design.md,
    Retrieval)."""
    if not isinstance(model, SeminarCTR):
        raise TypeError(f"export_gsu_tables needs a SeminarCTR, got {type(model).__name__}")
    emb, G = model.embedding, model.G
    device = emb.item_text.device
    items, gammas, queries = [], [], []
    none = torch.zeros(0, dtype=torch.long, device=device)
    # entity_channels, not item_channels/query_channel: a serving model's entity cache is read, not recomputed
    for start in range(0, emb.item_text.shape[0], chunk):
        ids = torch.arange(start, min(start + chunk, emb.item_text.shape[0]), device=device)
        _, channels, w = emb.entity_channels(none, ids)
        gammas.append(emb.gamma(w)[:, 1:].cpu())
        items.append(G(channels, slice(1, None)).cpu())
    for start in range(0, emb.query_tokens.shape[0], chunk):
        ids = torch.arange(start, min(start + chunk, emb.query_tokens.shape[0]), device=device)
        q, _, _ = emb.entity_channels(ids, none)
        queries.append(G(q.unsqueeze(-2), slice(0, 1)).squeeze(-2).cpu())
    item_channels = torch.cat(items).numpy().astype(np.float32)
    item_gamma = torch.cat(gammas).numpy().astype(np.float32)
    item_channels[0], item_gamma[0] = 0.0, 0.0  # padding item
    return GSUTables(
        item_channels=item_channels,
        item_gamma=item_gamma,
        query_channel=torch.cat(queries).numpy().astype(np.float32),
        query_gamma=float(model.cfg.lam),
    )
