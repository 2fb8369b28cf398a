"""The contract between a trained GSU and the retriever: per-entity channel vectors in GSU space (docs/design.md,
Retrieval)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GSUTables:
    """Per-entity GSU-space vectors; a behaviour (q, i) has key k = λ·x^Q_q + Σ_j γ_ij·x^(j)_i (paper §3.3.1).

    The model folds its head projections into one target vector u per candidate so that the GSU score of
    behaviour l is exactly <u, k_l> (docs/design.md, Retrieval); the retriever never sees the heads.
    """

    item_channels: np.ndarray  # float32 [N+1, 3, d]: T, I, A channel vectors after G_j; row 0 is padding (zeros)
    item_gamma: np.ndarray  # float32 [N+1, 3]: γ_j = (1-λ)·w_j(item) for j in T, I, A; row 0 zeros
    query_channel: np.ndarray  # float32 [Q+1, d]: Q channel after G_Q; row 0 is the empty query's vector
    query_gamma: float  # λ
    _folded: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # computed once, read-only

    @property
    def dim(self) -> int:
        return int(self.item_channels.shape[-1])

    def item_folded(self) -> np.ndarray:
        """[N+1, d]: Σ_j γ_ij x^(j)_i, the item's part of every key it appears in (computed once; read-only)."""
        if "item" not in self._folded:
            out = np.empty((len(self.item_channels), self.dim), dtype=np.float32)
            for s in range(0, len(out), 1 << 16):
                out[s : s + (1 << 16)] = np.einsum(
                    "nj,njd->nd", self.item_gamma[s : s + (1 << 16)], self.item_channels[s : s + (1 << 16)]
                )
            out.flags.writeable = False
            self._folded["item"] = out
        return self._folded["item"]

    def query_folded(self) -> np.ndarray:
        """[Q+1, d]: λ·x^Q_q, the query's part of every key it appears in (computed once; read-only)."""
        if "query" not in self._folded:
            out = (self.query_gamma * self.query_channel).astype(np.float32)
            out.flags.writeable = False
            self._folded["query"] = out
        return self._folded["query"]

    def keys(self, query_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Exact fp32 keys [L, d] of a history given by ids."""
        return self.query_folded()[query_ids] + self.item_folded()[item_ids]
