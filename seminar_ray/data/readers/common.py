"""Shared reader logic: raw behaviours → the tables of docs/design.md, Data model (dense ids, chronological sequences,
queries).

Every source reader turns its files into one `Behaviours` record (one row per positive behaviour, original
keys) plus an `ItemInfo` record (per original item key: title, image reference, attribute values) and calls
`assemble`, which

1. drops users with fewer than `min_interactions` behaviours (paper §4.1: 4 for KuaiSAR, 5-core for Amazon);
2. sorts each user's behaviours by timestamp (ties keep file order) and keeps the most recent `max_len`;
3. remaps users, items, queries and keyword tokens to dense ids in order of first appearance in that
   (user, time) order: users 1..U, items 1..N (only items some kept behaviour references), queries 1..Q
   (0 = the empty query), tokens 1..T; attribute ids 1..A, one per distinct (field, value) pair;
4. keeps the original keys as `id_maps.parquet` (columns kind, id, original) in `DatasetTables.extra_files`.

Query rule for sources without search queries (Amazon, RecBole; `derive_query`): the paper builds each
item's query "from its description" (§4.1). Ours: strip HTML tags from the description, lower-case it, split
into words of letters/digits, drop English stopwords, words shorter than 2 characters, pure numbers and any
word equal to the item's own id; the query is the first 3 distinct remaining words. When the description
gives none, the same filter is applied to the item's leaf category (the last category entry). When neither
gives a word, the behaviour gets the empty query. An item's id never becomes query text.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from seminar_ray.data.errors import DataError
from seminar_ray.data.schema import ITEMS, QUERIES, SEQUENCES, DatasetMeta, DatasetTables

log = logging.getLogger(__name__)

PROGRESS_EVERY = 1_000_000  # rows between progress log lines on large inputs
QUERY_WORDS = 3
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off
    on once only or other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with you your yours yourself yourselves dvd vhs blu ray
    movie film edition""".split()
)
_WORD = re.compile(r"[a-z0-9]+")
_TAG = re.compile(r"<[^>]*>")
_NUMBER = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"
_INT_LIST = r"^\s*\[\s*(\d+\s*(,\s*\d+\s*)*)?\]\s*$"


# ---------------------------------------------------------------- files and columns


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    return path


def require_columns(found: list[str], columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (found {found})")


def read_csv(
    path: Path,
    columns: list[str],
    *,
    delimiter: str = ",",
    optional: tuple[str, ...] = (),
    string_columns: tuple[str, ...] = (),
) -> pa.Table:
    """Read `columns` (+ any present `optional` ones) of a CSV file; all errors name the file."""
    require_file(path)
    header = read_header(path, delimiter)
    require_columns(header, columns, path)
    wanted = list(columns) + [c for c in optional if c in header]
    types = {c: pa.string() for c in string_columns if c in wanted}
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter == "\t" else '"'),
            convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=types),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: cannot parse ({exc})") from exc
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    if table.num_rows >= PROGRESS_EVERY:
        log.info("%s: read %d rows", path, table.num_rows)
    return table


def read_header(path: Path, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        line = f.readline().rstrip("\r\n")
    if not line.strip():
        raise DataError(f"{path}: empty header line")
    return [c.strip().strip('"') for c in line.split(delimiter)]


def row_where(path: Path, column: str, row: int, what: str, value=None, *, header: bool = True) -> DataError:
    """An error naming file, column and data row (with a header line, data row 0 is line 2)."""
    shown = "" if value is None else f" {value!r}"
    line = row + 2 if header else row + 1
    return DataError(f"{path}: column '{column}', row {row} (line {line}): {what}{shown}")


def parse_timestamps(col: pa.ChunkedArray | pa.Array, path: Path, column: str, *, header: bool = True) -> np.ndarray:
    """A numeric or numeric-text timestamp column → int64 (the source's unit); the first bad row is named."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        ok = pc.fill_null(pc.match_substring_regex(col, _NUMBER), False).to_numpy(zero_copy_only=False)
        if not ok.all():
            bad = int(np.argmin(ok))
            raise row_where(path, column, bad, "unparsable timestamp", col[bad].as_py(), header=header)
        col = pc.cast(col, pa.float64())
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataError(f"{path}: column '{column}' is {col.type}, expected numeric timestamps")
    if col.null_count:
        bad = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise row_where(path, column, bad, "missing timestamp", header=header)
    values = col.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise row_where(path, column, bad, "unparsable timestamp", float(values[bad]), header=header)
        values = np.rint(values)
    return values.astype(np.int64)


def parse_int_lists(col: pa.ChunkedArray | pa.Array, path: Path, column: str) -> pa.ListArray:
    """Keyword/caption lists written like `[20, 34, 3]` → list<int64>; blank is null; a malformed row is named."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    col = blank_to_null(col)
    ok = pc.fill_null(pc.match_substring_regex(col, _INT_LIST), True).to_numpy(zero_copy_only=False)
    if not ok.all():
        bad = int(np.argmin(ok))
        raise row_where(path, column, bad, "malformed id list, expected e.g. [20, 34, 3], got", col[bad].as_py())
    inner = pc.replace_substring_regex(col, r"[\[\]\s]", "")
    parts = pc.split_pattern(inner, ",")
    flat = pc.list_flatten(parts)
    keep = pc.not_equal(flat, "")
    return _regroup(
        pc.list_parent_indices(parts).to_numpy(),
        pc.cast(flat.filter(keep), pa.int64()),
        keep.to_numpy(zero_copy_only=False),
        len(col),
        parts.is_null(),
    )


def split_tokens(col: pa.ChunkedArray | pa.Array, sep: str = " ") -> pa.ListArray:
    """A `token_seq` string column (space-separated) → list<string>, empty tokens dropped."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    parts = pc.split_pattern(pc.cast(col, pa.string()), sep)
    flat = pc.list_flatten(parts)
    keep = pc.not_equal(flat, "")
    return _regroup(
        pc.list_parent_indices(parts).to_numpy(),
        flat.filter(keep),
        keep.to_numpy(zero_copy_only=False),
        len(col),
        parts.is_null(),
    )


def _regroup(parents: np.ndarray, values: pa.Array, keep: np.ndarray, n: int, nulls: pa.Array) -> pa.ListArray:
    counts = np.bincount(parents[keep], minlength=n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=nulls)


# ---------------------------------------------------------------- query rule


def query_words(text: str | None, forbidden: str = "") -> list[str]:
    """Content words of `text` per the module docstring's rule (at most QUERY_WORDS, in order)."""
    if not text:
        return []
    out: list[str] = []
    bad = forbidden.lower()
    for w in _WORD.findall(_TAG.sub(" ", text).lower()):
        if len(w) < 2 or w.isdigit() or w in STOPWORDS or w == bad or w in out:
            continue
        out.append(w)
        if len(out) == QUERY_WORDS:
            break
    return out


def derive_query(description: str | None, categories: list[str] | None, item_key: str) -> str | None:
    """The query text of an item without search logs: description words, else leaf-category words, else None."""
    words = query_words(description, item_key)
    if not words and categories:
        leaf = next((c for c in reversed(categories) if c and c.strip()), None)
        words = query_words(leaf, item_key)
    return " ".join(words) if words else None


# ---------------------------------------------------------------- assembling the tables


@dataclass
class Behaviours:
    """One row per positive behaviour, with the source's own keys.

    query: a space-separated token string per behaviour (null = the empty query). For text queries the
    tokens are words and the string is the query text; for anonymised keyword ids (KuaiSAR) the tokens are
    the ids and `query_has_text` is False.
    """

    user: pa.Array
    item: pa.Array
    query: pa.Array
    timestamp: np.ndarray  # int64, the source's unit
    timestamp_unit: str  # "s", "ms" or "row" (file order, when the source has no timestamps)
    query_has_text: bool


@dataclass
class ItemInfo:
    """Per original item key: title, image reference and attribute values by field (nulls allowed)."""

    key: pa.Array
    title: pa.Array | None = None
    image_ref: pa.Array | None = None
    attributes: dict[str, pa.Array] = field(default_factory=dict)  # field → list<string> or scalar column


def check_known(
    keys: pa.Array, known: pa.Array, path: Path, column: str, *, rows: np.ndarray | None = None, header: bool = True
) -> None:
    """Every behaviour's item key must be a known item; the first unknown one is named with its file row
    (`rows[i]` is the file row of `keys[i]` when `keys` was filtered)."""
    found = pc.is_in(keys, value_set=pc.unique(known)).to_numpy(zero_copy_only=False)
    if not found.all():
        bad = int(np.argmin(found))
        row = bad if rows is None else int(rows[bad])
        raise row_where(path, column, row, "references an unknown item", keys[bad].as_py(), header=header)


def assemble(
    source: str,
    behaviours: Behaviours,
    items: ItemInfo,
    *,
    min_interactions: int,
    max_len: int,
    extra: dict | None = None,
) -> DatasetTables:
    """Filter, order, truncate and remap `behaviours` into DatasetTables (module docstring, steps 1-4)."""
    if min_interactions < 1 or max_len < 1:
        raise DataError(f"min_interactions ({min_interactions}) and max_len ({max_len}) must be >= 1")
    n = len(behaviours.user)
    user_codes = _codes(behaviours.user)
    counts = np.bincount(user_codes)
    order = np.lexsort((behaviours.timestamp, user_codes))
    order = order[counts[user_codes[order]] >= min_interactions]
    if len(order) == 0:
        raise DataError(f"{source}: no user has >= {min_interactions} interactions (of {n} behaviours)")
    sorted_users = user_codes[order]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    group_len = np.diff(np.r_[group_start, len(order)])
    from_end = np.repeat(group_start + group_len, group_len) - np.arange(len(order))
    order = order[from_end <= max_len]
    log.info("%s: %d behaviours kept of %d (%d users)", source, len(order), n, len(group_start))

    take = pa.array(order)
    user_keys, user_ids = _dense(behaviours.user.take(take))
    item_keys, item_ids = _dense(behaviours.item.take(take))
    queries, query_ids, token_keys = _queries(behaviours.query.take(take), behaviours.query_has_text)
    sequences = _sequences(user_ids, query_ids, item_ids, behaviours.timestamp[order])
    items_table, attr_keys = _items(item_keys, items)
    meta = DatasetMeta(
        source=source,
        num_items=len(item_keys),
        num_queries=len(queries) - 1,
        num_attrs=len(attr_keys),
        num_tokens=len(token_keys),
        num_users=len(user_keys),
        num_behaviours=len(order),
        extra={
            "timestamp_unit": behaviours.timestamp_unit,
            "min_interactions": min_interactions,
            "max_len": max_len,
            **(extra or {}),
        },
    )
    maps = id_maps({"user": user_keys, "item": item_keys, "token": token_keys, "attr": attr_keys})
    return DatasetTables(items_table, queries, sequences, meta, {"id_maps.parquet": maps})


def _codes(keys: pa.Array) -> np.ndarray:
    """0-based codes of `keys` in order of first appearance (vectorised dictionary encoding)."""
    enc = pc.dictionary_encode(keys)
    enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _dense(keys: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Distinct keys in order of first appearance, and each row's dense id 1..N."""
    enc = pc.dictionary_encode(keys)
    enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
    return enc.dictionary, enc.indices.to_numpy(zero_copy_only=False).astype(np.int64) + 1


def _queries(keys: pa.Array, has_text: bool) -> tuple[pa.Table, np.ndarray, pa.Array]:
    """Query ids per behaviour (0 = empty) and the queries table; tokens get a dense vocabulary 1..T."""
    keys = blank_to_null(keys)
    present = keys.is_valid().to_numpy(zero_copy_only=False)
    query_ids = np.zeros(len(keys), dtype=np.int64)
    distinct = pa.array([], pa.string())
    if present.any():
        distinct, ids = _dense(keys.filter(pa.array(present)))
        query_ids[present] = ids
    tokens = split_tokens(distinct)
    token_keys, token_ids = (
        _dense(pc.list_flatten(tokens)) if len(distinct) else (pa.array([], pa.string()), np.zeros(0, np.int64))
    )
    token_lists = pa.ListArray.from_arrays(tokens.offsets, pa.array(token_ids.astype(np.int32)))
    queries = pa.table(
        {
            "query_id": np.arange(len(distinct) + 1, dtype=np.int64),
            "token_ids": pa.concat_arrays([pa.array([[]], pa.list_(pa.int32())), token_lists]),
            "text": pa.concat_arrays(
                [pa.array([None], pa.string()), distinct if has_text else pa.nulls(len(distinct), pa.string())]
            ),
            "text_emb": pa.nulls(len(distinct) + 1, QUERIES.field("text_emb").type),
        },
        schema=QUERIES,
    )
    return queries, query_ids, token_keys


def _sequences(user_ids: np.ndarray, query_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray) -> pa.Table:
    """Behaviours already sorted by (user, time) → one row per user with list columns."""
    starts = np.r_[0, np.flatnonzero(np.diff(user_ids)) + 1]
    offsets = pa.array(np.r_[starts, len(user_ids)].astype(np.int32))
    lists = {
        name: pa.ListArray.from_arrays(offsets, pa.array(v, pa.int64()))
        for name, v in (("item_ids", item_ids), ("query_ids", query_ids), ("timestamps", ts))
    }
    return pa.table({"user_id": pa.array(user_ids[starts], pa.int64()), **lists}, schema=SEQUENCES)


def _items(item_keys: pa.Array, info: ItemInfo) -> tuple[pa.Table, pa.Array]:
    """Items 1..N in `item_keys` order, joined to their info; attribute (field, value) pairs get ids 1..A."""
    pos = pc.index_in(item_keys, value_set=info.key)
    found = pos.is_valid().to_numpy(zero_copy_only=False)
    rows = pc.fill_null(pos, 0)

    def column(values: pa.Array | None) -> pa.Array:
        if values is None:
            return pa.nulls(len(item_keys), pa.string())
        taken = values.take(rows)
        return pc.if_else(pa.array(found), taken, pa.scalar(None, taken.type))

    title = blank_to_null(column(info.title))
    image_ref = blank_to_null(column(info.image_ref))
    attr_ids, attr_keys = _attributes({f: column(v) for f, v in info.attributes.items()}, len(item_keys))
    table = pa.table(
        {
            "item_id": np.arange(1, len(item_keys) + 1, dtype=np.int64),
            "title": title,
            "attr_ids": attr_ids,
            "image_ref": image_ref,
            "text_emb": pa.nulls(len(item_keys), ITEMS.field("text_emb").type),
            "image_emb": pa.nulls(len(item_keys), ITEMS.field("image_emb").type),
        },
        schema=ITEMS,
    )
    return table, attr_keys


def blank_to_null(col: pa.Array) -> pa.Array:
    col = pc.cast(col, pa.string())
    return pc.if_else(pc.equal(pc.utf8_trim_whitespace(col), ""), pa.scalar(None, pa.string()), col)


def _attributes(fields: dict[str, pa.Array], n: int) -> tuple[pa.Array, pa.Array]:
    """Per item, the ids of its distinct "field=value" strings in field order; null values are skipped."""
    parents, values = [], []
    for name, col in fields.items():
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            col = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), col)
        flat = pc.list_flatten(col)
        p = pc.list_parent_indices(col).to_numpy()
        keep = flat.is_valid().to_numpy(zero_copy_only=False)
        strs = pc.binary_join_element_wise(f"{name}=", pc.cast(flat.filter(pa.array(keep)), pa.string()), "")
        parents.append(p[keep])
        values.append(strs)
    if not parents or sum(len(p) for p in parents) == 0:
        return pa.array([[] for _ in range(n)], pa.list_(pa.int32())), pa.array([], pa.string())
    parent = np.concatenate(parents)
    order = np.argsort(parent, kind="stable")
    value = pa.concat_arrays(values).take(pa.array(order))
    parent = parent[order]
    keys, ids = _dense(value)
    pair = parent * (len(keys) + 1) + ids
    _, first = np.unique(pair, return_index=True)
    first.sort()
    parent, ids = parent[first], ids[first]
    offsets = np.r_[0, np.cumsum(np.bincount(parent, minlength=n))].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int32))), keys


def id_maps(maps: dict[str, pa.Array]) -> bytes:
    """The dense-id → original-key tables as one Parquet file (kind, id, original)."""
    kinds, ids, originals = [], [], []
    for kind, keys in maps.items():
        kinds.append(pa.array([kind] * len(keys), pa.string()))
        ids.append(pa.array(np.arange(1, len(keys) + 1, dtype=np.int64)))
        originals.append(pc.cast(keys, pa.string()))
    table = pa.table(
        {"kind": pa.concat_arrays(kinds), "id": pa.concat_arrays(ids), "original": pa.concat_arrays(originals)}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
