"""SASRec text files (`user_id item_id` per line) → the tables of docs/design.md, Data model.

The de facto format of the SASRec line of work: the public SASRec implementations (kang205/SASRec and
pmixer/SASRec.pytorch, directory `data/`) distribute `Video.txt` (Amazon Video Games), `Beauty.txt`, `Steam.txt`
and `ml-1m.txt` in it.

Input: one file, one action per line, a user id and an item id (non-negative integers) separated by whitespace.
Each user's actions appear in time order (the file order is the time order; users may interleave); there are no
timestamps, texts or images. Blank lines are skipped; any other line that is not two integers is an error naming
file and line.

- Every line is a positive behaviour; `meta.extra.timestamp_unit` is "row" (the line's position in the file).
- Items are ids only, as in a RecBole `.inter` without its `.item` file: no title, image or attributes, so no
  CLIP features and no derived queries. The native query mode is `none` (every behaviour gets the empty query).
- The published files are already filtered by their makers, so `jobs/prepare_data.py` keeps every user by
  default (`--min-interactions 1`): users with fewer than 3 actions have no validation or test target and only
  train, as in SASRec's own split. Ids are kept as their decimal value (`007` and `7` are one id).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seminar_ray.data.errors import DataError
from seminar_ray.data.readers.common import PROGRESS_EVERY, Behaviours, ItemInfo, assemble, require_file
from seminar_ray.data.schema import DatasetTables

log = logging.getLogger(__name__)

FIELDS = ("user_id", "item_id")


def read(input_path: Path, *, min_interactions: int, max_len: int) -> DatasetTables:
    path = Path(input_path)
    if path.is_dir():
        raise DataError(f"{path}: SASRec input must be one text file of `user_id item_id` lines, not a directory")
    users, items = read_pairs(path)
    item_col = pa.array(items, pa.string())
    behaviours = Behaviours(
        user=pa.array(users, pa.string()),
        item=item_col,
        query=pa.nulls(len(items), pa.string()),
        timestamp=np.arange(len(items), dtype=np.int64),
        timestamp_unit="row",
        query_has_text=True,
    )
    return assemble(
        "sasrec-txt",
        behaviours,
        ItemInfo(key=pc.unique(item_col)),
        min_interactions=min_interactions,
        max_len=max_len,
        extra={"input": str(path)},
    )


def read_pairs(path: Path) -> tuple[list[str], list[str]]:
    """The (user, item) keys of every non-blank line, in file order; the first malformed line is named."""
    require_file(path)
    users: list[str] = []
    items: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                user, item = _parse_line(fields, path, number)
                users.append(user)
                items.append(item)
                if number % PROGRESS_EVERY == 0:
                    log.info("%s: %d lines", path, number)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    if not users:
        raise DataError(f"{path}: no data rows (only blank lines)")
    return users, items


def _parse_line(fields: list[str], path: Path, number: int) -> tuple[str, str]:
    if len(fields) != len(FIELDS):
        raise DataError(
            f"{path}: line {number}: expected 2 whitespace-separated fields `user_id item_id`, "
            f"got {len(fields)}: {' '.join(fields)!r}"
        )
    for name, value in zip(FIELDS, fields):
        if not (value.isascii() and value.isdigit()):  # a header line or a stray token
            raise DataError(f"{path}: line {number}: {name} {value!r} is not a non-negative integer")
    return str(int(fields[0])), str(int(fields[1]))
