"""`RedisHistoryStore`: user histories in a Redis server, so serving needs no shared file system (docs/scaling.md).

Layout, per user u (the hash tag `{u}` keeps a user's keys in one slot):
- `seminar:{u}:b`  the base history from sequences.parquet, written by `load_base` (SET: idempotent);
- `seminar:{u}:e`  appended behaviours (APPEND);
- `seminar:{u}:t`  the appended behaviours' timestamps, int64 (kept for export; serving never reads them);
- `seminar:seq`    the last append's sequence number (INCR).
A behaviour is 8 bytes, (query_id, item_id) as little-endian int32: no JSON, and `history` reads only the last
`max_len` of them with GETRANGE inside one Lua script (one round trip, never the whole history).

Durability: an append is one Lua script (APPEND, APPEND, INCR), which Redis writes to its AOF as one MULTI/EXEC
block; with `appendfsync always` Redis fsyncs that before it replies, and on restart drops a torn block whole.
A writer refuses a server without `appendonly yes` + `appendfsync always` (checked at connect and after every
reconnection). Appends are never retried by the client: a timed-out append may have been applied, so retrying
could apply it twice; the caller gets `HistoryUnavailable` and the append counts as unacknowledged.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from seminar_ray.data.errors import DataError
from seminar_ray.data.schema import table_path
from seminar_ray.serving.history import EMPTY, History, HistoryStore, HistoryUnavailable, check_append

log = logging.getLogger(__name__)

PREFIX = "seminar"
SEQ_KEY = f"{PREFIX}:seq"
RECORD = np.dtype([("q", "<i4"), ("i", "<i4")])  # one behaviour in Redis: 8 bytes
STAMP = np.dtype("<i8")
INT32_MAX = int(np.iinfo(np.int32).max)
CONNECT_TIMEOUT_S = 1.0  # an unreachable server is a 503 within about this, not a hung request
COMMAND_TIMEOUT_S = 2.0  # an fsync-always append on a slow disk still fits
T = TypeVar("T")

APPEND_LUA = """
redis.call('APPEND', KEYS[1], ARGV[1])
redis.call('APPEND', KEYS[2], ARGV[2])
return redis.call('INCR', KEYS[3])
"""
# The last ARGV[1] bytes of base .. events, reading only those bytes of each.
HISTORY_LUA = """#!lua flags=no-writes
local want = tonumber(ARGV[1])
local e = redis.call('GETRANGE', KEYS[2], -want, -1)
if #e >= want then return e end
return redis.call('GETRANGE', KEYS[1], -(want - #e), -1) .. e
"""


def base_key(user_id: int) -> str:
    return f"{PREFIX}:{{{int(user_id)}}}:b"


def events_key(user_id: int) -> str:
    return f"{PREFIX}:{{{int(user_id)}}}:e"


def stamps_key(user_id: int) -> str:
    return f"{PREFIX}:{{{int(user_id)}}}:t"


class UnsafeRedis(RuntimeError):
    """The server would lose acknowledged appends (or does not let us check that it would not)."""


def pack(query_ids: Any, item_ids: Any) -> bytes:
    """(query, item) pairs as 8-byte records; ids outside 0..2**31-1 are refused, naming the bound."""
    q, i = np.asarray(query_ids, dtype=np.int64), np.asarray(item_ids, dtype=np.int64)
    for name, ids in (("query", q), ("item", i)):
        if ids.size and (ids.min() < 0 or ids.max() > INT32_MAX):
            bad = ids[(ids < 0) | (ids > INT32_MAX)][0]
            raise ValueError(f"{name} id {bad} does not fit the Redis store's int32 records (0..{INT32_MAX})")
    rec = np.empty(len(i), dtype=RECORD)
    rec["q"], rec["i"] = q, i
    return rec.tobytes()


def unpack(data: bytes) -> History:
    rec = np.frombuffer(data, dtype=RECORD)
    return rec["q"].astype(np.int64), rec["i"].astype(np.int64)


def connect(url: str) -> redis.Redis:
    """A client with bounded waits and no automatic retries (see the module docstring); the URL's own query
    options (e.g. `?socket_timeout=5`) win over these defaults."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


def check_durable(client: redis.Redis, url: str) -> None:
    """Refuse a server whose acknowledged writes would not survive a crash, naming the setting."""
    try:
        config = client.config_get("append*")
    except redis.ResponseError as e:
        raise UnsafeRedis(
            f"{url}: CONFIG GET appendonly/appendfsync was refused ({e}); the history store must check that the "
            f"server runs with appendonly yes and appendfsync always"
        ) from e
    for name, want in (("appendonly", "yes"), ("appendfsync", "always")):
        got = config.get(name)
        if got != want:
            raise UnsafeRedis(
                f"{url}: {name} is {got!r}, the history store needs {name} {want}: acknowledged appends would be "
                f"lost on a crash (redis-server --appendonly yes --appendfsync always)"
            )


class RedisHistoryStore(HistoryStore):
    """The `HistoryStore` contract on a Redis server; any number of writers and readers, on any nodes.

    Read-your-writes holds across replicas because every read goes to the one primary that acknowledged the
    append. One instance is safe to share between threads (redis-py's pool hands each call its own connection).
    """

    def __init__(self, url: str, writer: bool = False):
        self.url = url
        self.client = connect(url)
        self._writer = writer
        self._checked = False
        self._seq = 0
        self._append = self.client.register_script(APPEND_LUA)
        self._history = self.client.register_script(HISTORY_LUA)
        if writer:
            try:
                self._ensure_durable()
            except HistoryUnavailable as e:  # checked before the first append instead
                log.warning("history store not reachable yet, durability checked before the first append: %s", e)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self._checked = False  # a restarted server may come back with other settings
            raise HistoryUnavailable(f"history store {self._where()} unavailable: {type(e).__name__}: {e}") from e

    def _where(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}/{kw.get('db', 0)}"

    def _ensure_durable(self) -> None:
        if not self._checked:
            self._call(lambda: check_durable(self.client, self._where()))
            self._checked = True

    def append(self, user_id: int, query_ids: list[int], item_ids: list[int], timestamps: list[int]) -> int:
        if not self._writer:
            raise PermissionError(f"{self._where()}: this store was opened read-only (writer=False)")
        check_append(query_ids, item_ids, timestamps)
        records = pack(query_ids, item_ids)
        stamps = np.asarray(timestamps, dtype=np.int64).astype(STAMP).tobytes()
        self._ensure_durable()
        keys = [events_key(user_id), stamps_key(user_id), SEQ_KEY]
        seq = int(self._call(lambda: self._append(keys=keys, args=[records, stamps])))
        self._seq = max(self._seq, seq)
        return seq

    def refresh(self) -> int:
        value = self._call(lambda: self.client.get(SEQ_KEY))
        self._seq = max(self._seq, int(value or 0))
        return self._seq

    def history(self, user_id: int, max_len: int) -> History:
        if max_len <= 0:
            return EMPTY, EMPTY
        keys = [base_key(user_id), events_key(user_id)]
        data = self._call(lambda: self._history(keys=keys, args=[max_len * RECORD.itemsize]))
        return unpack(data)

    @property
    def last_seq(self) -> int:
        return self._seq

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------------------- bulk load
@dataclass(frozen=True)
class LoadReport:
    users: int  # users written by this call
    behaviours: int
    seconds: float
    resumed_from: int  # rows already loaded by an earlier, interrupted call
    total_users: int


def dataset_fingerprint(data_dir: str | Path) -> str:
    """Names a dataset's sequences table by its Parquet footer and size: the loader's progress is kept per table."""
    path = table_path(data_dir, "sequences")
    meta = pq.ParquetFile(path).metadata
    text = f"{path.stat().st_size}:{meta.num_rows}:{meta.num_row_groups}:{meta.serialized_size}:{meta.created_by}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_base(url: str, data_dir: str | Path, batch_users: int = 512) -> LoadReport:
    """Put `data_dir`'s sequences.parquet into Redis as base histories, `batch_users` users per pipelined MULTI.

    Resumable: each batch's SETs and the progress counter (`seminar:load:<fingerprint>`, rows done) commit in one
    transaction, so a rerun after a crash starts at the first row not committed. Idempotent: SET writes the same
    bytes again, and a finished table is not re-read. Appended events live in other keys and are never touched.
    """
    path = table_path(data_dir, "sequences")
    if not path.exists():
        raise DataError(f"{path}: missing table 'sequences'")
    if batch_users < 1:
        raise ValueError(f"batch_users must be ≥ 1, got {batch_users}")
    store = RedisHistoryStore(url, writer=True)
    store._ensure_durable()
    progress_key = f"{PREFIX}:load:{dataset_fingerprint(data_dir)}"
    pf = pq.ParquetFile(path)
    total = pf.metadata.num_rows
    done = int(store._call(lambda: store.client.get(progress_key)) or 0)
    start, t0, users, behaviours, row = done, time.perf_counter(), 0, 0, 0
    for batch in pf.iter_batches(batch_size=batch_users, columns=["user_id", "item_ids", "query_ids"]):
        lo, row = max(0, done - row), row + batch.num_rows
        if lo >= batch.num_rows:
            continue
        n = _write_batch(store, batch.slice(lo), progress_key, row)
        users, behaviours, done = users + batch.num_rows - lo, behaviours + n, row
    store.close()
    seconds = time.perf_counter() - t0
    log.info(
        "loaded %d users, %d behaviours into %s in %.1f s (resumed at row %d of %d)",
        users,
        behaviours,
        store._where(),
        seconds,
        start,
        total,
    )
    return LoadReport(users, behaviours, seconds, start, total)


def _write_batch(store: RedisHistoryStore, batch: Any, progress_key: str, rows_done: int) -> int:
    """SET every user's packed base history and the progress counter in one transaction; returns behaviours."""
    user_ids = batch.column("user_id").to_numpy()
    lengths = pc.list_value_length(batch.column("item_ids")).to_numpy(zero_copy_only=False)
    packed = pack(
        pc.list_flatten(batch.column("query_ids")).to_numpy(), pc.list_flatten(batch.column("item_ids")).to_numpy()
    )
    ends = np.cumsum(lengths) * RECORD.itemsize
    pipe = store.client.pipeline(transaction=True)
    for u, lo, hi in zip(user_ids.tolist(), np.r_[0, ends[:-1]].tolist(), ends.tolist()):
        pipe.set(base_key(u), packed[lo:hi])
    pipe.set(progress_key, rows_done)
    store._call(pipe.execute)
    return int(lengths.sum())
