"""The two history stores side by side, with redis-benchmark's own LPUSH on the same server as the ceiling.

    python -m bench.history_store --out bench/out/history_store.json [--quick] [--users N]

Self-contained: writes a sequences.parquet of N users × L = 2,000 behaviours, starts a private redis-server on
127.0.0.1 (appendonly yes, appendfsync always: the setting RedisHistoryStore demands) and measures, per store:
bulk load (users/s, behaviours/s; for the log store that is a reader opening the base), history(user, 2,000)
p50/p99, appends/s with fsync (1 and 4 threads), and a reader's start-up time and peak RSS in a fresh process.
Redis memory per behaviour comes from MEMORY USAGE. Every figure has os.getloadavg() beside it; loopback only,
bounded counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seminar_ray.serving.history import HistoryStore, LogHistoryStore, open_store
from seminar_ray.serving.redis_store import RedisHistoryStore, base_key, load_base
from seminar_ray.testing.redis_local import LocalRedis, redis_binary

L = 2000


def figure(**values) -> dict:
    return {**values, "load_avg": os.getloadavg()}


def write_sequences(out: Path, users: int, min_len: int = L, seed: int = 0) -> int:
    """sequences.parquet only (all either store reads): `users` users of min_len..L behaviours, in row groups.
    Returns the number of behaviours."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = 0
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_ids", pa.list_(pa.int64())),
            ("query_ids", pa.list_(pa.int64())),
            ("timestamps", pa.list_(pa.int64())),
        ]
    )
    with pq.ParquetWriter(out / "sequences.parquet", schema) as w:
        for lo in range(0, users, 1024):
            n = min(1024, users - lo)
            off = np.r_[0, np.cumsum(rng.integers(min_len, L + 1, n))].astype(np.int32)
            cols = [
                pa.ListArray.from_arrays(pa.array(off), pa.array(rng.integers(lo_id, hi_id, off[-1])))
                for lo_id, hi_id in ((1, 200_000), (0, 5_000), (0, 10**9))
            ]
            w.write_table(pa.table([pa.array(np.arange(lo, lo + n)), *cols], schema=schema))
            total += int(off[-1])
    return total


def latencies(store, users: int, n: int) -> dict:
    rng = np.random.default_rng(1)
    lat = []
    for u in rng.integers(0, users, n):
        t0 = time.perf_counter()
        store.history(int(u), L)
        lat.append(time.perf_counter() - t0)
    ms = np.asarray(lat) * 1e3
    return figure(calls=n, p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)))


def appends(writer, n: int, threads: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: writer.append(10**7 + k % 97, [0], [k % 1000 + 1], [k]), range(n)))
    seconds = time.perf_counter() - t0
    return figure(appends=n, threads=threads, per_s=n / seconds)


STARTUP = """
import os, resource, sys, time
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
from seminar_ray.serving.history import open_store
import redis
before, peak_before = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
store = open_store(sys.argv[1], sys.argv[2])
store.refresh(); store.history(0, 2000)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before
print(time.perf_counter() - t0, rss_mb() - before, peak)
"""


def startup(store: str, data: Path) -> dict:
    """A reader (what a Retriever replica opens) in a fresh process, its modules already imported: seconds to the
    first history, and the RSS it added (held, and how far loading raised the process's peak)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", STARTUP, store, str(data)], capture_output=True, text=True, check=True, env=env
    )
    seconds, rss_mb, peak_mb = map(float, out.stdout.split())
    return figure(seconds=seconds, added_rss_mb=rss_mb, added_peak_rss_mb=peak_mb)


def redis_benchmark(port: int, n: int, clients: int) -> dict:
    """redis-benchmark's LPUSH on the same server: the ceiling of one fsync-always write per command."""
    out = subprocess.run(
        [
            redis_binary("redis-benchmark"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            "lpush",
            "-n",
            str(n),
            "-c",
            str(clients),
            "--csv",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    row = [line for line in out.stdout.splitlines() if line.startswith('"LPUSH')][0]
    return figure(clients=clients, requests=n, per_s=float(row.split(",")[1].strip('"')))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/history_store.json"))
    ap.add_argument("--quick", action="store_true", help="2,000 users, fewer calls (a couple of minutes)")
    ap.add_argument("--users", type=int, help="users (default 2,000 quick, 10,000)")
    ap.add_argument(
        "--min-len",
        type=int,
        default=L,
        help="histories of min-len..2,000 behaviours (default all 2,000; the `large` preset's shape is 1000)",
    )
    args = ap.parse_args(argv)
    users = args.users or (2000 if args.quick else 10_000)
    with tempfile.TemporaryDirectory(prefix="history_bench_") as tmp:  # the large shape writes gigabytes
        result = measure(Path(tmp), users, args.min_len, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


def measure(root: Path, users: int, min_len: int, quick: bool) -> dict:
    calls, n_app = (500, 300) if quick else (2000, 1000)
    t_start = time.time()
    result: dict = {"users": users, "L": L, "min_len": min_len, "quick": quick, "load_avg_before": os.getloadavg()}
    t0 = time.perf_counter()
    data = root / "data"
    behaviours = result["behaviours"] = write_sequences(data, users, min_len)
    result["write_parquet_s"] = time.perf_counter() - t0
    with LocalRedis(root / "redis") as server:
        t0 = time.perf_counter()
        report = load_base(server.url, data, batch_users=256)
        s = time.perf_counter() - t0
        result["redis"] = {
            "bulk_load": figure(
                seconds=s, users_per_s=users / s, behaviours_per_s=behaviours / s, loaded_users=report.users
            )
        }
        t0 = time.perf_counter()
        log_reader = LogHistoryStore(root / "log", data)
        s = time.perf_counter() - t0
        result["log"] = {
            "bulk_load": figure(
                seconds=s,
                users_per_s=users / s,
                behaviours_per_s=behaviours / s,
                note="a reader opening the base: what every replica does at start",
            )
        }
        redis_reader = RedisHistoryStore(server.url)
        readers: tuple[tuple[str, HistoryStore], ...] = (("log", log_reader), ("redis", redis_reader))
        for name, store in readers:
            result[name]["history_L2000"] = latencies(store, users, calls)
        writers: tuple[tuple[str, HistoryStore], ...] = (
            ("log", LogHistoryStore(root / "log", writer=True)),
            ("redis", open_store(server.url, writer=True)),
        )
        for name, store in writers:
            result[name]["appends"] = [appends(store, n_app, t) for t in (1, 4)]
            store.close()
        result["redis"]["redis_benchmark_lpush"] = [redis_benchmark(server.port, 4 * n_app, c) for c in (1, 4)]
        client = redis_reader.client
        used = client.info("memory")["used_memory"]
        result["redis"]["memory"] = figure(
            bytes_per_behaviour_base_key=(client.memory_usage(base_key(0)) or 0) / (client.strlen(base_key(0)) / 8),
            used_memory_bytes=used,
            used_memory_per_behaviour=used / behaviours,
        )
        result["redis"]["startup"] = startup(server.url, data)
    result["log"]["startup"] = startup(str(root / "log"), data)
    result["log"]["resident_base_mb"] = log_reader.base.nbytes / 2**20
    result["load_avg_after"] = os.getloadavg()
    result["wall_s"] = time.time() - t_start
    return result


if __name__ == "__main__":
    sys.exit(main())
