"""Entity feature tables as dense id-indexed arrays: what the model looks up by id (docs/design.md, Data model and
Model contracts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from seminar_ray import storage
from seminar_ray.data.schema import FEATURE_DIM, DatasetMeta, feature_matrix, read_table


def pad_lists(
    col: pa.ChunkedArray | pa.Array, ids: np.ndarray, n_rows: int, max_width: int | None = None
) -> np.ndarray:
    """list<int> column → int64 [n_rows, width] indexed by `ids`, right-padded with 0."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pa.compute.list_value_length(arr).fill_null(0).to_numpy()
    width = int(lengths.max()) if len(lengths) else 0
    width = max(1, min(width, max_width) if max_width else width)
    out = np.zeros((n_rows, width), dtype=np.int64)
    values = pa.compute.list_flatten(arr).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for row, start, n in zip(ids, starts, lengths):
        n = min(n, width)
        out[row, :n] = values[start : start + n]
    return out


@dataclass
class EntityTables:
    """Row i of each array describes item i (or query i); row 0 is padding / the empty query."""

    item_text: np.ndarray  # float32 [N+1, 512]
    item_text_mask: np.ndarray  # bool [N+1]
    item_image: np.ndarray  # float32 [N+1, 512]
    item_image_mask: np.ndarray  # bool [N+1]
    item_attrs: np.ndarray  # int64 [N+1, A] (0 = padding)
    query_tokens: np.ndarray  # int64 [Q+1, T] (0 = padding)
    query_text: np.ndarray  # float32 [Q+1, 512]
    query_text_mask: np.ndarray  # bool [Q+1]
    meta: DatasetMeta

    @classmethod
    def load(cls, data_dir: str | Path, max_attrs: int = 16, max_tokens: int = 16) -> EntityTables:
        data_dir = storage.local_dir(data_dir)  # a shared URI is mirrored into the node-local cache once
        meta = DatasetMeta.load(data_dir)
        items = read_table(data_dir, "items")
        queries = read_table(data_dir, "queries")
        n_items, n_queries = meta.num_items + 1, meta.num_queries + 1
        iid = items.column("item_id").to_numpy()
        qid = queries.column("query_id").to_numpy()

        def by_id(table, column, ids, n):
            dense, present = feature_matrix(table, column)
            out = np.zeros((n, FEATURE_DIM), dtype=np.float32)
            mask = np.zeros(n, dtype=bool)
            out[ids], mask[ids] = dense, present
            return out, mask

        it, itm = by_id(items, "text_emb", iid, n_items)
        ii, iim = by_id(items, "image_emb", iid, n_items)
        qt, qtm = by_id(queries, "text_emb", qid, n_queries)
        qtm[0] = False
        return cls(
            item_text=it,
            item_text_mask=itm,
            item_image=ii,
            item_image_mask=iim,
            item_attrs=pad_lists(items.column("attr_ids"), iid, n_items, max_attrs),
            query_tokens=pad_lists(queries.column("token_ids"), qid, n_queries, max_tokens),
            query_text=qt,
            query_text_mask=qtm,
            meta=meta,
        )
