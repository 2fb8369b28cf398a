"""The three Parquet tables of docs/design.md (Data model), defined once, with their validation and atomic writer."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seminar_ray import storage
from seminar_ray.data.errors import DataError

FEATURE_DIM = 512  # CLIP ViT-B/32 text and image embedding width (paper §4.1)
EMPTY_QUERY = 0  # query id of a browse behaviour (paper §3.1)
PAD_ITEM = 0  # item id 0 is padding

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("attr_ids", pa.list_(pa.int32())),
        pa.field("image_ref", pa.string()),  # path or URL of the item's image, for feature extraction
        pa.field("text_emb", pa.list_(pa.float32(), FEATURE_DIM)),
        pa.field("image_emb", pa.list_(pa.float32(), FEATURE_DIM)),
    ]
)
QUERIES = pa.schema(
    [
        pa.field("query_id", pa.int64(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("text", pa.string()),
        pa.field("text_emb", pa.list_(pa.float32(), FEATURE_DIM)),
    ]
)
SEQUENCES = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int64())),
        pa.field("query_ids", pa.list_(pa.int64())),
        pa.field("timestamps", pa.list_(pa.int64())),
    ]
)
TABLES = {"items": ITEMS, "queries": QUERIES, "sequences": SEQUENCES}


@dataclass
class DatasetMeta:
    """Sizes the model needs to build its tables; written as meta.json beside the Parquet files."""

    source: str
    num_items: int  # item ids are 1..num_items
    num_queries: int  # query ids are 0..num_queries (0 = empty query)
    num_attrs: int  # attribute ids are 1..num_attrs (0 = padding)
    num_tokens: int  # keyword token ids are 1..num_tokens (0 = padding)
    num_users: int
    num_behaviours: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, data_dir: str | Path) -> DatasetMeta:
        path = storage.join(data_dir, "meta.json")  # data_dir may be a shared URI
        if not storage.exists(path):
            raise DataError(f"{path}: missing; is {data_dir} a directory written by jobs/prepare_data.py?")
        return cls(**json.loads(storage.read_text(path)))


@dataclass
class DatasetTables:
    """What every source reader returns and `write_dataset` writes."""

    items: pa.Table
    queries: pa.Table
    sequences: pa.Table
    meta: DatasetMeta
    extra_files: dict[str, bytes] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> Path:
        return write_dataset(out_dir, self.items, self.queries, self.sequences, self.meta, self.extra_files)


def table_path(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / f"{name}.parquet"


def conform(table: pa.Table, name: str) -> pa.Table:
    """Cast `table` to the schema of table `name`, naming the column when it cannot."""
    schema = TABLES[name]
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{name}: cannot cast to the schema ({exc})") from exc


def _ids(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy()


def validate(items: pa.Table, queries: pa.Table, sequences: pa.Table) -> None:
    """Check the id contracts of docs/design.md (Data model); each failure names the table, column and row."""
    validate_entities(items, queries)
    if len(sequences) == 0:
        raise DataError("sequences: empty table")
    validate_sequences(sequences, len(items), len(queries) - 1)


def validate_entities(items: pa.Table, queries: pa.Table) -> None:
    """Items are exactly 1..N and queries exactly 0..Q."""
    item_ids = _ids(items, "item_id")
    if len(item_ids) == 0:
        raise DataError("items: empty table")
    if not np.array_equal(np.sort(item_ids), np.arange(1, len(item_ids) + 1)):
        raise DataError("items.item_id: ids must be exactly 1..N (0 is padding)")
    query_ids = _ids(queries, "query_id")
    if not np.array_equal(np.sort(query_ids), np.arange(0, len(query_ids))):
        raise DataError("queries.query_id: ids must be exactly 0..Q with 0 the empty query")


def validate_sequences(sequences: pa.Table, num_items: int, num_queries: int) -> None:
    """Rows (of the whole table or one chunk of it) have equal list lengths and ids in 1..num_items, 0..num_queries."""
    lengths = {
        c: pa.compute.list_value_length(sequences.column(c)).to_numpy() for c in ("item_ids", "query_ids", "timestamps")
    }
    bad = np.nonzero((lengths["item_ids"] != lengths["query_ids"]) | (lengths["item_ids"] != lengths["timestamps"]))[0]
    if len(bad):
        raise DataError(f"sequences row {bad[0]}: item_ids, query_ids and timestamps differ in length")
    flat_items = pa.compute.list_flatten(sequences.column("item_ids")).to_numpy()
    flat_queries = pa.compute.list_flatten(sequences.column("query_ids")).to_numpy()
    row_of = np.repeat(np.arange(len(sequences)), lengths["item_ids"])
    for col, flat, hi, lo in (("item_ids", flat_items, num_items, 1), ("query_ids", flat_queries, num_queries, 0)):
        bad = np.nonzero((flat < lo) | (flat > hi))[0]
        if len(bad):
            r = row_of[bad[0]]
            uid = sequences.column("user_id")[int(r)].as_py()
            raise DataError(f"sequences row {r} (user_id {uid}).{col}: unknown id {flat[bad[0]]}")


def write_dataset(
    out_dir: str | Path,
    items: pa.Table,
    queries: pa.Table,
    sequences: pa.Table,
    meta: DatasetMeta,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Validate, then write all tables into a temporary sibling directory that replaces `out_dir` whole."""
    items, queries, sequences = conform(items, "items"), conform(queries, "queries"), conform(sequences, "sequences")
    validate(items, queries, sequences)
    out = Path(out_dir)
    with storage.staged_dir(out) as tmp:
        for name, table in (("items", items), ("queries", queries), ("sequences", sequences)):
            pq.write_table(table, table_path(tmp, name), row_group_size=256 if name == "sequences" else 8192)
        (tmp / "meta.json").write_text(meta.to_json())
        for fname, blob in (extra_files or {}).items():
            (tmp / fname).write_bytes(blob)
    return out


def write_streamed(
    out_dir: str | Path, num_items: int, num_queries: int, build: Callable[[SequenceSink], DatasetTables]
) -> Path:
    """Write a dataset whose sequences come in chunks of users, never held whole: `build(sink)` hands each chunk to
    `sink` (conformed, validated against ids 1..num_items and 0..num_queries, written as row groups of 256 users),
    then returns the items, queries, meta and extra files (its `sequences` is ignored). Atomic like write_dataset."""
    out = Path(out_dir)
    with storage.staged_dir(out) as tmp:
        with pq.ParquetWriter(table_path(tmp, "sequences"), SEQUENCES) as writer:
            sink = SequenceSink(writer, num_items, num_queries)
            tables = build(sink)
        if sink.rows == 0:
            raise DataError("sequences: empty table")
        items, queries = conform(tables.items, "items"), conform(tables.queries, "queries")
        validate_entities(items, queries)
        if (len(items), len(queries) - 1) != (num_items, num_queries):
            raise DataError(
                f"items/queries: {len(items)} items and {len(queries) - 1} queries, but the sequences were "
                f"validated against {num_items} and {num_queries}"
            )
        for name, table in (("items", items), ("queries", queries)):
            pq.write_table(table, table_path(tmp, name), row_group_size=8192)
        (tmp / "meta.json").write_text(tables.meta.to_json())
        for fname, blob in tables.extra_files.items():
            (tmp / fname).write_bytes(blob)
    return out


@dataclass
class SequenceSink:
    """Validates and appends chunks of the sequences table to an open ParquetWriter (write_streamed)."""

    writer: pq.ParquetWriter
    num_items: int
    num_queries: int
    rows: int = 0

    def __call__(self, chunk: pa.Table) -> None:
        chunk = conform(chunk, "sequences")
        validate_sequences(chunk, self.num_items, self.num_queries)
        self.writer.write_table(chunk, row_group_size=256)
        self.rows += len(chunk)


def read_table(data_dir: str | Path, name: str, columns: list[str] | None = None) -> pa.Table:
    path = table_path(data_dir, name)
    if not path.exists():
        raise DataError(f"{path}: missing table '{name}'")
    return pq.read_table(path, columns=columns)


def feature_matrix(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A nullable fixed_size_list column as a dense float32 [N, 512] matrix (zeros where null) and a presence mask."""
    col = table.column(column).combine_chunks()
    present = ~col.is_null().to_numpy(zero_copy_only=False)
    out = np.zeros((len(col), FEATURE_DIM), dtype=np.float32)
    if present.any():
        values = col.filter(pa.array(present)).flatten().to_numpy()
        out[present] = values.reshape(-1, FEATURE_DIM)
    return out, present
