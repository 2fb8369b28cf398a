"""User histories for serving: base sequences plus durable appends (docs/design.md, Serving).

`HistoryStore` is the interface the service needs. Two stores implement it:
- `LogHistoryStore`, the embedded default (no server): one writer appends JSON lines to `<store_dir>/events.log`
  and fsyncs before `append` returns; every reader holds the base `sequences.parquet` in flat arrays and tails the
  log on `refresh()`. Each reader process holds all histories, and the log needs a file system every reader sees.
- `RedisHistoryStore` (redis_store.py): per-user packed ids in a Redis server with `appendfsync always`; readers
  fetch only the behaviours a request uses, from any node.
`open_store` picks one from the `store` setting: a `redis://` URL or a directory.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seminar_ray.data.errors import DataError
from seminar_ray.data.schema import table_path

LOG_FILE = "events.log"
History = tuple[np.ndarray, np.ndarray]  # (query_ids, item_ids), chronological, int64
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class HistoryUnavailable(RuntimeError):
    """The store cannot be reached or did not answer in time: the service answers 503 with this message."""


class HistoryStore(ABC):
    """Per-user chronological (query_id, item_id) histories with durable appends and read-your-writes.

    Contract: when `append` returns seq s, the events are durable (they survive the writer's SIGKILL); a reader
    whose `refresh()` returns ≥ s sees them in `history`. Sequence numbers increase by one per append.
    """

    @abstractmethod
    def append(self, user_id: int, query_ids: list[int], item_ids: list[int], timestamps: list[int]) -> int:
        """Append behaviours to the end of a user's history; durable on return; returns the append's seq."""

    @abstractmethod
    def refresh(self) -> int:
        """Catch up with every acknowledged append; returns the last seq now visible."""

    @abstractmethod
    def history(self, user_id: int, max_len: int) -> History:
        """The user's last `max_len` behaviours (empty arrays for an unknown user: cold start)."""

    @property
    @abstractmethod
    def last_seq(self) -> int:
        """The last seq this instance has written or read."""

    def close(self) -> None:  # noqa: B027 - a store without resources has nothing to release
        """Release files or connections."""


def open_store(store: str | Path, data_dir: str | Path | None = None, writer: bool = False) -> HistoryStore:
    """The store `store` names: a `redis://host:port/db` URL (RedisHistoryStore; its base histories are loaded
    beforehand by jobs/load_histories.py, so `data_dir` is not read) or a directory (LogHistoryStore over
    `data_dir`'s sequences.parquet)."""
    if str(store).startswith(REDIS_SCHEMES):
        from seminar_ray.serving.redis_store import RedisHistoryStore

        return RedisHistoryStore(str(store), writer=writer)
    if "://" in str(store):
        raise ValueError(f"store {store!r}: a history store is a redis:// URL or a local directory")
    return LogHistoryStore(store, data_dir, writer=writer)


def check_append(query_ids: list[int], item_ids: list[int], timestamps: list[int]) -> None:
    """Both stores refuse the same malformed appends, naming the lengths."""
    if not len(query_ids) == len(item_ids) == len(timestamps) or not item_ids:
        raise ValueError(
            f"append needs equal, non-empty query/item/timestamp lists, got "
            f"{len(query_ids)}/{len(item_ids)}/{len(timestamps)}"
        )


@dataclass(frozen=True)
class BaseHistories:
    """Every user's base history in flat arrays: user `row`'s behaviours are `items[offsets[row]:offsets[row+1]]`.

    Why flat: per-user Python objects cost several times the ids themselves at 100,000 users × 2,000 behaviours.
    Ids are held as int32 when they fit (half the memory); `history` returns int64 copies of ≤ max_len.
    """

    users: np.ndarray  # sorted user ids
    rows: np.ndarray  # rows[k] = the row of users[k]
    offsets: np.ndarray  # int64, len(rows) + 1
    queries: np.ndarray
    items: np.ndarray

    @classmethod
    def empty(cls) -> BaseHistories:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, np.zeros(1, dtype=np.int64), z, z)

    @classmethod
    def load(cls, data_dir: str | Path) -> BaseHistories:
        """Read sequences.parquet batch by batch, narrowing each batch's ids before the next is read."""
        path = table_path(data_dir, "sequences")
        if not path.exists():
            raise DataError(f"{path}: missing table 'sequences'")
        users: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        queries: list[np.ndarray] = []
        items: list[np.ndarray] = []
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024, columns=["user_id", "item_ids", "query_ids"]):
            users.append(batch.column("user_id").to_numpy())
            lengths.append(pc.list_value_length(batch.column("item_ids")).to_numpy(zero_copy_only=False))
            for col, out in (("item_ids", items), ("query_ids", queries)):
                out.append(narrow(pc.list_flatten(batch.column(col)).to_numpy()))
        if not users:
            return cls.empty()
        user_ids = np.concatenate(users)
        order = np.argsort(user_ids, kind="stable")
        offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
        base = cls(user_ids[order], order, offsets, _concat(queries), _concat(items))
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps the batches' pages otherwise
        return base

    def row(self, user_id: int) -> int | None:
        k = int(np.searchsorted(self.users, user_id))
        return int(self.rows[k]) if k < len(self.users) and self.users[k] == user_id else None

    def last(self, user_id: int, n: int) -> History:
        """The user's last `n` base behaviours as int64."""
        row = self.row(user_id)
        if row is None or n <= 0:
            return EMPTY, EMPTY
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        lo = max(lo, hi - n)
        return self.queries[lo:hi].astype(np.int64), self.items[lo:hi].astype(np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.users, self.rows, self.offsets, self.queries, self.items))


def narrow(ids: np.ndarray) -> np.ndarray:
    """int32 when every id fits, else int64 unchanged."""
    if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        return ids.astype(np.int64, copy=False)
    return ids.astype(np.int32)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    dtype = np.result_type(*parts)  # int64 as soon as one batch needed it
    return np.concatenate(parts).astype(dtype, copy=False)


class Tail:
    """One user's appended behaviours in arrays that double when full: an append costs O(events), not O(history)."""

    __slots__ = ("queries", "items", "n")

    def __init__(self) -> None:
        self.queries = np.zeros(8, dtype=np.int64)
        self.items = np.zeros(8, dtype=np.int64)
        self.n = 0

    def extend(self, queries: list[int], items: list[int]) -> None:
        need = self.n + len(items)
        if need > len(self.items):
            cap = max(need, 2 * len(self.items))
            self.queries = np.resize(self.queries, cap)
            self.items = np.resize(self.items, cap)
        self.queries[self.n : need] = queries
        self.items[self.n : need] = items
        self.n = need

    def last(self, n: int) -> History:
        lo = max(0, self.n - n)
        return self.queries[lo : self.n].copy(), self.items[lo : self.n].copy()


class LogHistoryStore(HistoryStore):
    """Embedded store: base sequences.parquet (optional) + `events.log`, one JSON line per append.

    Only one process may open it with `writer=True` (the single-replica HistoryWriter); on open the writer drops
    a torn last line (a crash mid-write, never acknowledged). Readers only consume complete lines. One instance is
    safe to share between threads: Serve runs a replica's sync methods on a thread pool, so two appends may arrive
    at once, and without the lock both took the same seq (the fuzz in bench/fuzz.py found it).
    """

    def __init__(self, store_dir: str | Path, data_dir: str | Path | None = None, writer: bool = False):
        self.dir = Path(store_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / LOG_FILE
        self.base = BaseHistories.load(data_dir) if data_dir is not None else BaseHistories.empty()
        self._tails: dict[int, Tail] = {}
        self._offset, self._seq = 0, 0
        self._lock = threading.RLock()
        self._fd: int | None = None
        if writer:
            self._repair_tail()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            fsync_dir(self.dir)
        self.refresh()

    def _repair_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, user_id: int, query_ids: list[int], item_ids: list[int], timestamps: list[int]) -> int:
        if self._fd is None:
            raise PermissionError(f"{self.path}: this store was opened read-only (writer=False)")
        check_append(query_ids, item_ids, timestamps)
        with self._lock:
            self.refresh()
            seq = self._seq + 1
            line = json.dumps(
                {
                    "seq": seq,
                    "user_id": int(user_id),
                    "item_ids": [int(i) for i in item_ids],
                    "query_ids": [int(q) for q in query_ids],
                    "timestamps": [int(t) for t in timestamps],
                }
            )
            os.write(self._fd, (line + "\n").encode())
            os.fsync(self._fd)
            self.refresh()
            return seq

    def refresh(self) -> int:
        with self._lock:
            return self._refresh()

    def _refresh(self) -> int:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return self._seq
        if size <= self._offset:
            return self._seq
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        end = chunk.rfind(b"\n") + 1
        for raw in chunk[:end].splitlines():
            self._apply(json.loads(raw))
        self._offset += end
        return self._seq

    def _apply(self, record: dict) -> None:
        if record["seq"] != self._seq + 1:
            raise ValueError(f"{self.path}: seq {record['seq']} follows {self._seq} (log corrupted or two writers)")
        tail = self._tails.get(record["user_id"])
        if tail is None:
            tail = self._tails[record["user_id"]] = Tail()
        tail.extend(record["query_ids"], record["item_ids"])
        self._seq = record["seq"]

    def history(self, user_id: int, max_len: int) -> History:
        user = int(user_id)
        tail = self._tails.get(user)
        if tail is None:
            return self.base.last(user, max_len)
        tq, ti = tail.last(max_len)
        if len(ti) >= max_len:
            return tq, ti
        bq, bi = self.base.last(user, max_len - len(ti))
        return np.concatenate([bq, tq]), np.concatenate([bi, ti])

    @property
    def last_seq(self) -> int:
        return self._seq

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


EMPTY = np.zeros(0, dtype=np.int64)


def fsync_dir(path: Path) -> None:
    """Make a file's creation in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
