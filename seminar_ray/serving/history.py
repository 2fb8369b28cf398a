"""User histories for serving: base sequences plus an append-only, fsynced event log (docs/design.md, Serving).

`HistoryStore` is the interface the service needs; `LogHistoryStore` is the embedded default (no server):
one writer appends JSON lines to `<store_dir>/events.log` and fsyncs before `append` returns, any number of
readers load the base `sequences.parquet` once and tail the log on `refresh()`. A store backed by a real
server (Redis lists keyed by user, with WAIT/AOF fsync for durability) implements the same four methods.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from seminar_ray.data.schema import read_table

LOG_FILE = "events.log"
History = tuple[np.ndarray, np.ndarray]  # (query_ids, item_ids), chronological, int64


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
        self._users: dict[int, History] = load_base(data_dir) if data_dir is not None else {}
        self._offset, self._seq = 0, 0
        self._writer = writer
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
        if not len(query_ids) == len(item_ids) == len(timestamps) or not item_ids:
            raise ValueError(
                f"append needs equal, non-empty query/item/timestamp lists, got "
                f"{len(query_ids)}/{len(item_ids)}/{len(timestamps)}"
            )
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
        user = record["user_id"]
        q, i = self._users.get(user, (EMPTY, EMPTY))
        self._users[user] = (
            np.concatenate([q, np.asarray(record["query_ids"], dtype=np.int64)]),
            np.concatenate([i, np.asarray(record["item_ids"], dtype=np.int64)]),
        )
        self._seq = record["seq"]

    def history(self, user_id: int, max_len: int) -> History:
        q, i = self._users.get(int(user_id), (EMPTY, EMPTY))
        return q[-max_len:], i[-max_len:]

    @property
    def last_seq(self) -> int:
        return self._seq

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


EMPTY = np.zeros(0, dtype=np.int64)


def load_base(data_dir: str | Path) -> dict[int, History]:
    """user_id → (query_ids, item_ids) from the dataset's sequences.parquet."""
    seqs = read_table(data_dir, "sequences", ["user_id", "item_ids", "query_ids"]).to_pydict()
    return {
        int(u): (np.asarray(q, dtype=np.int64), np.asarray(i, dtype=np.int64))
        for u, i, q in zip(seqs["user_id"], seqs["item_ids"], seqs["query_ids"])
    }


def fsync_dir(path: Path) -> None:
    """Make a file's creation in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
