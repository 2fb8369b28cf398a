"""What a dataset's queries are (`jobs/prepare_data.py --queries`), and the empty-query transform.

- `source`: real search logs (KuaiSAR, the synthetic generator): a behaviour's query is what the user typed.
- `derived`: sources without search logs (RecBole, Amazon): every behaviour gets its item's query, derived from the
  item's own description or category (paper §4.1, Amazon). Every evaluation candidate then carries the positive's
  derived query, so a ranker that matches query and item text narrows the candidates with the answer's own words:
  report the QueryMatch+Pop rule (`seminar_ray.rule_rankers`) beside any model on such data.
- `none`: every behaviour gets the empty query (pure sequential recommendation). The only mode of sources with
  neither search logs nor item text (SASRec text files).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from seminar_ray.data.schema import EMPTY_QUERY, QUERIES, DatasetMeta, DatasetTables
from seminar_ray.errors import InputError

QUERY_MODES = ("source", "derived", "none")
NATIVE_MODE = {
    "synthetic": "source",
    "kuaisar": "source",
    "recbole": "derived",
    "amazon": "derived",
    "sasrec-txt": "none",
}
WHY_NATIVE = {
    "source": "it has real search logs",
    "derived": "it has no search log",
    "none": "it has neither search logs nor item text",
}


def resolve_mode(source: str, mode: str | None) -> str:
    """The query mode for `source` (its native one when None); a mode the source cannot give is an error."""
    native = NATIVE_MODE[source]
    mode = mode or native
    if mode not in QUERY_MODES:
        raise InputError(f"--queries {mode!r}: choose from {QUERY_MODES}")
    if mode != "none" and mode != native:
        raise InputError(
            f"--queries {mode}: source {source!r} gives {native!r} queries only "
            f"({WHY_NATIVE[native]}); use --queries {native}" + ("" if native == "none" else " or --queries none")
        )
    return mode


def empty_queries(seqs: pa.Table) -> pa.Table:
    """The sequences with every behaviour's query the empty one (query_ids zeros of the same list lengths)."""
    lengths = pa.compute.list_value_length(seqs.column("query_ids")).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    empty = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.full(int(offsets[-1]), EMPTY_QUERY, np.int64)))
    return seqs.set_column(seqs.schema.get_field_index("query_ids"), "query_ids", empty)


def apply_mode(tables: DatasetTables, mode: str) -> DatasetTables:
    """Record the mode in meta.extra["queries"]; for `none`, give every behaviour the empty query."""
    meta = DatasetMeta(**{**tables.meta.__dict__, "extra": {**tables.meta.extra, "queries": mode}})
    if mode != "none":
        return DatasetTables(tables.items, tables.queries, tables.sequences, meta, tables.extra_files)
    seqs = empty_queries(tables.sequences)
    queries = pa.table(
        {
            "query_id": [EMPTY_QUERY],
            "token_ids": pa.array([[]], pa.list_(pa.int32())),
            "text": pa.array([None], pa.string()),
            "text_emb": pa.nulls(1, QUERIES.field("text_emb").type),
        },
        schema=QUERIES,
    )
    meta.num_queries, meta.num_tokens = 0, 0
    return DatasetTables(tables.items, queries, seqs, meta, tables.extra_files)
