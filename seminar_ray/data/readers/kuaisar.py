"""KuaiSAR (a directory) → the tables of docs/design.md, Data model.

- Positives: `rec_inter.csv` rows with click = 1 (empty query) and `src_inter.csv` rows with click_cnt > 0,
  whose keyword list (`[20, 34, 3]`, anonymised token ids) is the query; both merge into one timeline per
  user by timestamp (milliseconds, kept as such: `meta.extra.timestamp_unit` = "ms").
- Queries: one per distinct keyword list; token ids are the keyword ids remapped to 1..T; text is null
  (the keywords are anonymised), so queries get no CLIP text feature.
- Items (`item_features.csv`): attributes are the category ids (first..fourth level), the author
  (author_id 0 is padding) and the caption's token ids, one id per (field, value). KuaiSAR has no readable
  title (captions are anonymised), so the text channel gets the English category path
  ("first > second > ...") from the `*_category_name_en` columns when the file has them.
- A positive behaviour whose item is missing from `item_features.csv` is an error naming file and row.
  `user_features.csv` and `social_network.csv` are not used (the tables carry no user features).
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
    blank_to_null,
    check_known,
    parse_int_lists,
    parse_timestamps,
    read_csv,
    row_where,
)
from seminar_ray.data.schema import DatasetTables

LEVELS = ("first", "second", "third", "fourth")
REC = ["user_id", "item_id", "timestamp", "click"]
SRC = ["user_id", "search_session_timestamp", "keyword", "item_id", "click_cnt"]


def read(input_path: Path, *, min_interactions: int, max_len: int) -> DatasetTables:
    root = Path(input_path)
    if not root.is_dir():
        raise DataError(
            f"{root}: KuaiSAR input must be a directory holding rec_inter.csv, src_inter.csv, item_features.csv"
        )
    items, info = _items(root / "item_features.csv")
    rec = _positives(root / "rec_inter.csv", "click", "timestamp", items, keyword=False)
    src = _positives(root / "src_inter.csv", "click_cnt", "search_session_timestamp", items, keyword=True)
    behaviours = Behaviours(
        user=pa.concat_arrays([rec["user"], src["user"]]),
        item=pa.concat_arrays([rec["item"], src["item"]]),
        query=pa.concat_arrays([rec["query"], src["query"]]),
        timestamp=np.concatenate([rec["ts"], src["ts"]]),
        timestamp_unit="ms",
        query_has_text=False,
    )
    return assemble(
        "kuaisar",
        behaviours,
        info,
        min_interactions=min_interactions,
        max_len=max_len,
        extra={"input": str(root), "rec_behaviours": len(rec["ts"]), "src_behaviours": len(src["ts"])},
    )


def _int64(table: pa.Table, column: str, path: Path) -> pa.Array:
    col = table.column(column).combine_chunks()
    if not pa.types.is_integer(col.type) or col.null_count:
        ok = pc.fill_null(pc.match_substring_regex(pc.cast(col, pa.string()), r"^\s*-?\d+\s*$"), False)
        bad = int(np.argmin(ok.to_numpy(zero_copy_only=False)))
        raise row_where(path, column, bad, "expected an integer id, got", col[bad].as_py())
    return pc.cast(col, pa.int64())


def _positives(path: Path, flag: str, ts_column: str, item_keys: pa.Array, *, keyword: bool) -> dict:
    """The positive rows of one interaction file: user, item, query key (null = empty) and timestamp."""
    table = read_csv(path, SRC if keyword else REC, string_columns=("keyword",) if keyword else ())
    flags = table.column(flag).combine_chunks()
    if not (pa.types.is_integer(flags.type) or pa.types.is_floating(flags.type)) or flags.null_count:
        ok = pc.fill_null(pc.match_substring_regex(pc.cast(flags, pa.string()), r"^\s*\d+(\.\d*)?\s*$"), False)
        bad = int(np.argmin(ok.to_numpy(zero_copy_only=False)))
        raise row_where(path, flag, bad, "expected a number, got", flags[bad].as_py())
    keep = pc.greater(flags, 0) if keyword else pc.equal(flags, 1)
    rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
    ts = parse_timestamps(table.column(ts_column), path, ts_column)[rows]
    users, items = (
        _int64(table, "user_id", path).take(pa.array(rows)),
        _int64(table, "item_id", path).take(pa.array(rows)),
    )
    check_known(items, item_keys, path, "item_id", rows=rows)
    if keyword:
        lists = parse_int_lists(table.column("keyword"), path, "keyword").take(pa.array(rows))
        query = _join_tokens(lists)
    else:
        query = pa.nulls(len(rows), pa.string())
    return {"user": users, "item": items, "query": query, "ts": ts}


def _join_tokens(lists: pa.ListArray) -> pa.Array:
    """[20, 34, 3] → "20 34 3" (the query key; an empty list is the empty query)."""
    return pc.binary_join(pc.cast(lists, pa.list_(pa.string())), " ")


def _items(path: Path) -> tuple[pa.Array, ItemInfo]:
    names = [f"{lvl}_level_category_name_en" for lvl in LEVELS]
    ids = [f"{lvl}_level_category_id" for lvl in LEVELS]
    table = read_csv(
        path, ["item_id", "caption"], optional=("author_id", *ids, *names), string_columns=("caption", *names)
    )
    keys = _int64(table, "item_id", path)
    attributes = {c: table.column(c).combine_chunks() for c in ids if c in table.column_names}
    if "author_id" in table.column_names:
        author = table.column("author_id").combine_chunks()
        attributes["author_id"] = pc.if_else(pc.equal(author, 0), pa.scalar(None, author.type), author)
    attributes["caption"] = parse_int_lists(table.column("caption"), path, "caption")
    present = [blank_to_null(table.column(c).combine_chunks()) for c in names if c in table.column_names]
    title = pc.binary_join_element_wise(*present, " > ", null_handling="skip") if present else None
    return keys, ItemInfo(key=keys, title=title, attributes=attributes)
