"""RecBole atomic files → the tables of docs/design.md, Data model.

Input: a directory holding one `<name>.inter` and optionally `<name>.item` (a `.user` file is ignored: the
tables carry no user features), or the `.inter` file itself with its siblings. Tab-separated, one header of
`name:type` fields, `token_seq` fields space-separated, no quoting.

- Every `.inter` row is a positive behaviour (`user_id`, `item_id`, optional `timestamp`; without a
  timestamp field the file order is the time order and `meta.extra.timestamp_unit` is "row").
- `.item`: the first field whose name contains "title" is the text channel (token_seq words joined by
  spaces); every other `token` / `token_seq` field becomes attributes, one id per (field, value).
- Queries: RecBole files have no search log, so each item gets the query of `common.derive_query` from its
  description field (a name containing "desc") or, failing that, its category field (the first of
  categories / category / class / genre / genres), whose last token is the leaf.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seminar_ray.data.errors import DataError
from seminar_ray.data.readers.common import (
    Behaviours,
    ItemInfo,
    assemble,
    check_known,
    derive_query,
    parse_timestamps,
    read_csv,
    read_header,
    require_file,
    split_tokens,
)
from seminar_ray.data.schema import DatasetTables

TYPES = ("token", "token_seq", "float", "float_seq")
CATEGORY_FIELDS = ("categories", "category", "class", "genre", "genres")


def read(input_path: Path, *, min_interactions: int, max_len: int) -> DatasetTables:
    inter_path, item_path = _locate(Path(input_path))
    inter, _ = _read_atomic(inter_path, required=("user_id", "item_id"))
    if "timestamp" in inter.column_names:
        ts, unit = parse_timestamps(inter.column("timestamp"), inter_path, "timestamp:float"), "s"
    else:
        ts, unit = np.arange(inter.num_rows, dtype=np.int64), "row"
    item_col = inter.column("item_id").combine_chunks()
    info = ItemInfo(key=pc.unique(item_col))
    query = pa.nulls(inter.num_rows, pa.string())
    if item_path is not None:
        items, types = _read_atomic(item_path, required=("item_id",))
        check_known(item_col, items.column("item_id").combine_chunks(), inter_path, "item_id:token")
        info, item_query = _item_info(items, types)
        query = item_query.take(pc.index_in(item_col, value_set=info.key))
    behaviours = Behaviours(
        user=inter.column("user_id").combine_chunks(),
        item=item_col,
        query=query,
        timestamp=ts,
        timestamp_unit=unit,
        query_has_text=True,
    )
    return assemble(
        "recbole",
        behaviours,
        info,
        min_interactions=min_interactions,
        max_len=max_len,
        extra={"input": str(inter_path)},
    )


def _locate(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if len(inters) != 1:
            raise DataError(f"{path}: expected exactly one .inter file, found {[p.name for p in inters]}")
        inter = inters[0]
    else:
        inter = path
    require_file(inter)
    if inter.suffix != ".inter":
        raise DataError(f"{inter}: expected a RecBole .inter file")
    item = inter.with_suffix(".item")
    return inter, (item if item.exists() else None)


def _read_atomic(path: Path, required: tuple[str, ...]) -> tuple[pa.Table, dict[str, str]]:
    """Read an atomic file as strings; columns are renamed to their bare names, types returned by name."""
    require_file(path)
    header = read_header(path, "\t")
    types = {}
    for field in header:
        name, sep, kind = field.partition(":")
        if not sep or kind not in TYPES:
            raise DataError(f"{path}: header field '{field}' is not name:type with type one of {TYPES}")
        types[name] = kind
    missing = [c for c in required if c not in types]
    if missing:
        raise DataError(f"{path}: missing column(s) {[f'{c}:token' for c in missing]} (found {header})")
    table = read_csv(path, header, delimiter="\t", string_columns=tuple(header))
    return table.rename_columns(list(types)), types


def _item_info(items: pa.Table, types: dict[str, str]) -> tuple[ItemInfo, pa.Array]:
    """Title, attributes and the derived query text of each `.item` row."""
    names = [n for n in types if n != "item_id"]
    title = next((n for n in names if "title" in n), None)
    desc = next((n for n in names if "desc" in n), None)
    category = next((n for n in CATEGORY_FIELDS if n in types), None)
    attributes = {}
    for name in names:
        if name in (title, desc) or types[name] not in ("token", "token_seq"):
            continue
        col = items.column(name).combine_chunks()
        attributes[name] = split_tokens(col) if types[name] == "token_seq" else col
    keys = items.column("item_id").combine_chunks()
    descriptions = items.column(desc).to_pylist() if desc else [None] * len(keys)
    categories = split_tokens(items.column(category).combine_chunks()).to_pylist() if category else [None] * len(keys)
    queries = pa.array(
        [derive_query(d, c, k) for d, c, k in zip(descriptions, categories, keys.to_pylist())], pa.string()
    )
    info = ItemInfo(key=keys, title=items.column(title).combine_chunks() if title else None, attributes=attributes)
    return info, queries
