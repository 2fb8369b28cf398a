"""The HistoryStore contract run against both stores: the embedded log and Redis (a real redis-server, started here).

Read-your-writes, concurrent appends, crashes (the Redis server SIGKILLed mid-stream and restarted from its AOF),
an unreachable server, the durability check at connect, the bulk loader's resume, and a behaviour's cost in Redis.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from seminar_ray.data.schema import read_table
from seminar_ray.serving.history import HistoryUnavailable, LogHistoryStore, open_store
from seminar_ray.serving.redis_store import (
    RECORD,
    RedisHistoryStore,
    UnsafeRedis,
    base_key,
    events_key,
    load_base,
    pack,
    stamps_key,
)
from seminar_ray.testing.redis_local import LocalRedis, free_port

STORES = ["log", "redis"]


@pytest.fixture
def stores(request, tmp_path, tiny_data):
    """(open(writer) → store over tiny_data's base histories) for the parametrised kind of store."""
    if request.param == "log":
        yield lambda writer=False: open_store(tmp_path / "log", tiny_data, writer=writer)
        return
    with LocalRedis(tmp_path / "redis") as server:
        load_base(server.url, tiny_data)
        yield lambda writer=False: open_store(server.url, tiny_data, writer=writer)


def base_histories(data) -> dict[int, tuple[list[int], list[int]]]:
    t = read_table(data, "sequences", ["user_id", "query_ids", "item_ids"]).to_pydict()
    return {u: (q, i) for u, q, i in zip(t["user_id"], t["query_ids"], t["item_ids"])}


@pytest.mark.parametrize("stores", STORES, indirect=True)
def test_read_your_writes_across_instances(stores, tiny_data):
    writer, reader = stores(writer=True), stores()
    base = base_histories(tiny_data)
    for user in (0, 7, 50):  # the whole base history, and its last 5, as in sequences.parquet
        q, i = reader.history(user, 10**6)
        assert (q.tolist(), i.tolist()) == base[user] and q.dtype == i.dtype == np.int64
        assert reader.history(user, 5)[1].tolist() == base[user][1][-5:]
    seq = writer.append(7, [0, 2], [5, 6], [10, 11])
    seq2 = writer.append(7, [3], [9], [12])
    assert seq2 == seq + 1 and writer.last_seq == seq2
    assert reader.refresh() >= seq2
    q, i = reader.history(7, 10**6)
    assert i.tolist() == base[7][1] + [5, 6, 9] and q.tolist() == base[7][0] + [0, 2, 3]
    assert reader.history(7, 4)[1].tolist() == [base[7][1][-1], 5, 6, 9]  # across the base/appended boundary
    assert reader.history(7, 2)[1].tolist() == [6, 9]
    assert reader.history(7, 0)[1].size == 0
    assert reader.history(10**9, 100)[1].size == 0  # unknown user: cold start
    assert writer.append(10**9, [0], [4], [1]) == seq2 + 1 and reader.refresh() == seq2 + 1
    assert reader.history(10**9, 100)[1].tolist() == [4]
    with pytest.raises(PermissionError, match="read-only"):
        reader.append(1, [0], [1], [0])
    with pytest.raises(ValueError, match="equal, non-empty"):
        writer.append(1, [0, 1], [1], [0])


def test_log_store_holds_its_base_in_flat_arrays(tiny_data, tmp_path):
    """No per-user Python objects for the base: ids in one int32 array each, user rows found by offsets."""
    store = LogHistoryStore(tmp_path, tiny_data)
    base = store.base
    assert base.items.dtype == base.queries.dtype == np.int32 and base.items.ndim == 1
    assert base.offsets[-1] == len(base.items) == sum(len(i) for _, i in base_histories(tiny_data).values())
    assert not store._tails  # nothing appended: no tail arrays


@pytest.mark.parametrize("stores", STORES, indirect=True)
def test_concurrent_appends_from_threads_take_consecutive_seqs(stores):
    writer = stores(writer=True)
    first = writer.refresh() + 1
    with ThreadPoolExecutor(8) as pool:
        seqs = list(pool.map(lambda n: writer.append(10**6 + n % 5, [0], [n + 1], [n]), range(200)))
    assert sorted(seqs) == list(range(first, first + 200))
    reader = stores()
    got = sorted(int(i) for u in range(5) for i in reader.history(10**6 + u, 10**6)[1])
    assert got == list(range(1, 201))  # every append once, none torn or doubled


APPENDER = textwrap.dedent("""
    import sys
    from seminar_ray.serving.redis_store import RedisHistoryStore
    from seminar_ray.serving.history import HistoryUnavailable
    url, tag, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = RedisHistoryStore(url, writer=True)
    for n in range(1, count + 1):
        try:
            seq = store.append(tag * 10**6 + n % 7, [tag], [n], [n])
        except HistoryUnavailable:
            break
        print(seq, n, flush=True)
""")


def appender(url: str, tag: int, count: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", APPENDER, url, str(tag), str(count)], stdout=subprocess.PIPE, text=True
    )


def test_redis_concurrent_appends_from_two_processes(local_redis):
    """Two writer processes (two HistoryWriter replicas on two nodes would be the same): distinct seqs, all kept.
    (The log store allows one writer process: test_serving.py covers its writer and its readers.)"""
    procs = [appender(local_redis.url, tag, 150) for tag in (1, 2)]
    acks = {tag: [tuple(map(int, line.split())) for line in p.stdout] for tag, p in zip((1, 2), procs)}
    assert [p.wait() for p in procs] == [0, 0]
    seqs = sorted(s for tag in acks for s, _ in acks[tag])
    assert seqs == list(range(1, 301))
    store = RedisHistoryStore(local_redis.url)
    for tag in (1, 2):
        items = [int(i) for u in range(7) for i in store.history(tag * 10**6 + u, 10**6)[1]]
        assert sorted(items) == list(range(1, 151))
        for u in range(7):  # each process's appends to a user in its own order
            assert store.history(tag * 10**6 + u, 10**6)[1].tolist() == [n for n in range(1, 151) if n % 7 == u]


def test_redis_sigkilled_after_acks_restarts_from_aof_with_every_acked_event_and_none_half_applied(local_redis):
    proc = appender(local_redis.url, 1, 10**6)
    acked = [tuple(map(int, proc.stdout.readline().split())) for _ in range(60)]
    local_redis.kill()  # SIGKILL while the appender keeps appending: some appends are in flight
    rest = [tuple(map(int, line.split())) for line in proc.stdout]
    assert proc.wait(timeout=30) == 0
    acked += rest
    local_redis.start()  # replays the AOF
    store = RedisHistoryStore(local_redis.url)
    last = store.refresh()
    assert last >= acked[-1][0] and [s for s, _ in acked] == list(range(1, len(acked) + 1))
    applied = range(1, last + 1)  # one writer: append n took seq n, so the store must hold exactly appends 1..last
    for u in range(7):
        want = [n for n in applied if (10**6 + n % 7) == 10**6 + u]
        q, items = store.history(10**6 + u, 10**7)
        assert items.tolist() == want and set(q.tolist()) <= {1}
        stamps = np.frombuffer(store.client.get(stamps_key(10**6 + u)) or b"", dtype="<i8")
        assert stamps.tolist() == want  # the timestamps key matches: no append applied in part
    assert last - acked[-1][0] <= 1  # at most the one append in flight at the kill, whole


def test_redis_that_would_lose_writes_is_refused_naming_the_setting(tmp_path):
    with LocalRedis(tmp_path / "everysec", appendfsync="everysec") as server:
        with pytest.raises(UnsafeRedis, match="appendfsync is 'everysec'.*appendfsync always"):
            RedisHistoryStore(server.url, writer=True)
        RedisHistoryStore(server.url).history(1, 10)  # reading is allowed
        server_client = RedisHistoryStore(server.url).client
        server_client.config_set("appendfsync", "always")
        server_client.config_set("appendonly", "no")
        with pytest.raises(UnsafeRedis, match="appendonly is 'no'"):
            RedisHistoryStore(server.url, writer=True)


def test_unreachable_redis_is_history_unavailable_within_a_bounded_time(local_redis):
    store = RedisHistoryStore(local_redis.url, writer=True)
    store.append(1, [0], [1], [0])
    local_redis.stop()
    for call in (lambda: store.history(1, 10), store.refresh, lambda: store.append(1, [0], [2], [0])):
        t0 = time.monotonic()
        with pytest.raises(HistoryUnavailable, match=f"127.0.0.1:{local_redis.port}/0 unavailable"):
            call()
        assert time.monotonic() - t0 < 3.0
    with pytest.raises(HistoryUnavailable):
        RedisHistoryStore(f"redis://127.0.0.1:{free_port()}/0").refresh()
    local_redis.start()  # the same store object recovers, re-checks durability and appends after seq 1
    assert store.append(1, [0], [3], [0]) == 2 and store.history(1, 10)[1].tolist() == [1, 3]


def test_bulk_load_resumes_after_a_crash_and_is_idempotent(local_redis, tiny_data, monkeypatch):
    from seminar_ray.serving import redis_store

    store = RedisHistoryStore(local_redis.url, writer=True)
    store.append(3, [0], [99], [0])  # appended before the load: the load must not drop it
    real, batches = redis_store._write_batch, []

    def crash_on_third(*args):
        if len(batches) == 2:
            raise KeyboardInterrupt("killed mid-load")
        batches.append(args[-1])
        return real(*args)

    monkeypatch.setattr(redis_store, "_write_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        load_base(local_redis.url, tiny_data, batch_users=16)
    monkeypatch.setattr(redis_store, "_write_batch", real)
    report = load_base(local_redis.url, tiny_data, batch_users=16)
    base = base_histories(tiny_data)
    assert report.resumed_from == 32 and report.users == len(base) - 32 and report.total_users == len(base)
    again = load_base(local_redis.url, tiny_data, batch_users=16)
    assert again.users == 0 and again.resumed_from == len(base)
    for user, (q, i) in base.items():
        got = store.history(user, 10**6)
        want_items = i + [99] if user == 3 else i
        assert got[1].tolist() == want_items and got[0].tolist() == (q + [0] if user == 3 else q)


def test_redis_behaviour_costs_8_bytes_and_history_reads_only_the_tail(local_redis):
    store = RedisHistoryStore(local_redis.url, writer=True)
    rng = np.random.default_rng(0)
    q, i = rng.integers(0, 1000, 2000), rng.integers(1, 10**6, 2000)
    store.client.set(base_key(5), pack(q, i))  # what load_base writes for a 2,000-behaviour user
    per_behaviour = store.client.memory_usage(base_key(5)) / 2000
    assert 8.0 <= per_behaviour < 8.5, per_behaviour  # jemalloc rounds the 16,000-byte string to 16,384
    assert RECORD.itemsize == 8
    hq, hi = store.history(5, 100)
    assert hi.tolist() == i[-100:].tolist() and hq.tolist() == q[-100:].tolist()
    with pytest.raises(ValueError, match="item id 2147483648 does not fit"):
        store.append(5, [0], [2**31], [0])
    assert store.client.exists(events_key(5)) == 0  # the refused append wrote nothing


def test_load_histories_job_loads_the_base_and_refuses_a_directory_store(local_redis, tiny_data, capsys):
    import json

    from jobs.load_histories import main
    from seminar_ray.runtime import run_cli

    assert run_cli(main, ["--data", str(tiny_data), "--store", local_redis.url]) == 0
    report = json.loads(capsys.readouterr().out)
    base = base_histories(tiny_data)
    assert report["users"] == report["total_users"] == len(base)
    assert RedisHistoryStore(local_redis.url).history(7, 10**6)[1].tolist() == base[7][1]
    assert run_cli(main, ["--data", str(tiny_data), "--store", "runs/history"]) == 2
    assert "expected a redis:// URL" in capsys.readouterr().err
