"""Amazon reviews 2018 (e.g. Movies_and_TV) → the tables of docs/design.md, Data model.

Input: a directory holding one reviews file (e.g. `Movies_and_TV_5.json.gz`) and one metadata file whose
name starts with `meta_`; each is JSON lines, gzipped (`.gz`) or not. Lines may be strict JSON or Python
literals (single quotes); a line that is neither is an error naming file and line.

- Every review is a positive behaviour (reviewerID, asin, unixReviewTime in seconds: the 5-core file is
  already filtered, `min_interactions` applies on top of it).
- Items: title → text channel; the first of imageURLHighRes / imageURL → image_ref (fetched by
  jobs/extract_features.py); categories and brand → attributes. Duplicate metadata lines for one asin
  (present in the real files) keep the first. A reviewed asin without metadata is an error.
- Queries: one per item, from `common.derive_query` over the description, else the leaf category (paper
  §4.1 builds each item's query from its description); never from the asin. Items where neither gives a
  word are reviewed with the empty query.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from seminar_ray.data.errors import DataError
from seminar_ray.data.readers import common
from seminar_ray.data.readers.common import PROGRESS_EVERY, Behaviours, ItemInfo, derive_query, require_file
from seminar_ray.data.schema import DatasetTables

log = logging.getLogger(__name__)

REVIEWS = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()), ("unixReviewTime", pa.int64())])
META = pa.schema(
    [
        ("asin", pa.string()),
        ("title", pa.string()),
        ("description", pa.list_(pa.string())),
        ("category", pa.list_(pa.string())),
        ("brand", pa.string()),
        ("imageURL", pa.list_(pa.string())),
        ("imageURLHighRes", pa.list_(pa.string())),
    ]
)


def read(input_path: Path, *, min_interactions: int, max_len: int) -> DatasetTables:
    reviews_path, meta_path = _locate(Path(input_path))
    reviews = read_json_lines(reviews_path, REVIEWS, required=("reviewerID", "asin", "unixReviewTime"))
    meta = _first_per_asin(read_json_lines(meta_path, META, required=("asin",)))
    asins = reviews.column("asin").combine_chunks()
    common.check_known(asins, meta.column("asin").combine_chunks(), reviews_path, "asin", header=False)
    meta = meta.filter(pc.is_in(meta.column("asin"), value_set=pc.unique(asins)))
    info, item_query = _item_info(meta)
    behaviours = Behaviours(
        user=reviews.column("reviewerID").combine_chunks(),
        item=asins,
        query=item_query.take(pc.index_in(asins, value_set=info.key)),
        timestamp=common.parse_timestamps(
            reviews.column("unixReviewTime"), reviews_path, "unixReviewTime", header=False
        ),
        timestamp_unit="s",
        query_has_text=True,
    )
    return common.assemble(
        "amazon",
        behaviours,
        info,
        min_interactions=min_interactions,
        max_len=max_len,
        extra={"reviews": str(reviews_path), "metadata": str(meta_path)},
    )


def _locate(root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise DataError(f"{root}: Amazon input must be a directory holding a reviews file and a meta_*.json(.gz) file")
    files = [p for p in sorted(root.iterdir()) if p.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))]
    meta = [p for p in files if p.name.startswith("meta_")]
    reviews = [p for p in files if not p.name.startswith("meta_")]
    if len(meta) != 1 or len(reviews) != 1:
        raise DataError(
            f"{root}: expected one reviews file and one meta_* file (.json/.jsonl, optionally .gz), "
            f"found reviews {[p.name for p in reviews]}, metadata {[p.name for p in meta]}"
        )
    return require_file(reviews[0]), require_file(meta[0])


def read_json_lines(path: Path, schema: pa.Schema, required: tuple[str, ...]) -> pa.Table:
    """JSON lines → `schema` columns: pyarrow's reader for strict JSON, else a per-line JSON / Python-literal
    parse. A required field missing on some line is an error naming that line."""
    require_file(path)
    try:
        table = pajson.read_json(
            path, parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        log.info("%s: not plain JSON for pyarrow (%s); parsing line by line", path, str(exc).splitlines()[0])
        table = _read_lines(path, schema)
    if table.num_rows == 0:
        raise DataError(f"{path}: no records")
    for name in required:
        col = table.column(name)
        if col.null_count == len(col):
            raise DataError(f"{path}: missing field '{name}' (no line has it)")
        if col.null_count:
            bad = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(f"{path}: line {bad + 1}: missing field '{name}'")
    return table


def _read_lines(path: Path, schema: pa.Schema) -> pa.Table:
    columns: dict[str, list] = {f.name: [] for f in schema}
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = _parse_line(line, path, number)
                for field in schema:
                    columns[field.name].append(_normalise(record.get(field.name), field.type))
                if number % PROGRESS_EVERY == 0:
                    log.info("%s: %d lines", path, number)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    types = {f.name: pa.string() if f.name == "unixReviewTime" else f.type for f in schema}
    return pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})


def _parse_line(line: str, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise DataError(f"{path}: line {number}: neither JSON nor a Python literal ({exc})") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {number}: expected an object, got {type(record).__name__}")
    return record


def _normalise(value, type_: pa.DataType):
    """Coerce one field to its column type: lists stay lists of strings (a bare string becomes [s]),
    scalars become strings (timestamps are parsed later, so their errors name the row)."""
    if value is None:
        return None
    if pa.types.is_list(type_):
        items = value if isinstance(value, list) else [value]
        return [str(v) for v in items]
    return str(value)


def _first_per_asin(meta: pa.Table) -> pa.Table:
    codes = pc.dictionary_encode(meta.column("asin").combine_chunks()).indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    return meta.take(pa.array(np.sort(first)))


def _item_info(meta: pa.Table) -> tuple[ItemInfo, pa.Array]:
    """Title, image reference, attributes and the derived query text of each metadata row."""
    keys = meta.column("asin").combine_chunks()
    descriptions = meta.column("description").to_pylist()
    categories = meta.column("category").to_pylist()
    queries = [
        derive_query(" ".join(d) if d else None, c, k) for d, c, k in zip(descriptions, categories, keys.to_pylist())
    ]
    images = [
        (hi or lo or [None])[0]
        for hi, lo in zip(meta.column("imageURLHighRes").to_pylist(), meta.column("imageURL").to_pylist())
    ]
    info = ItemInfo(
        key=keys,
        title=meta.column("title").combine_chunks(),
        image_ref=pa.array(images, pa.string()),
        attributes={
            "category": meta.column("category").combine_chunks(),
            "brand": meta.column("brand").combine_chunks(),
        },
    )
    return info, pa.array(queries, pa.string())
