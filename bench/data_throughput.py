"""Sequences/s at L = 2,000 through the Ray Data pipeline into a consumer, against a plain pyarrow reader.

Both paths do the same work per user sequence: read it from Parquet, draw this epoch's training targets
with their negatives and build the [B, L] tensors of the batch contract. The ratios are the figures:
steady state (after the first batch) and end to end (including Ray Data's start-up, the time to the
first batch, which a long epoch amortises).

    python -m bench.data_throughput --out bench/out/data.json [--users 400] [--L 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from seminar_ray.data.pipeline import TrainCollate, read_sequences, sample_config, train_batches
from seminar_ray.data.schema import table_path
from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir
from seminar_ray.runtime import init_ray


def consume(batches) -> dict:
    """Touch every tensor like a training step's input would; time to the first batch and in all."""
    t0 = time.perf_counter()
    users: set[int] = set()
    first: float | None = None
    samples, first_users = 0, 0
    for batch in batches:
        samples += int(batch["hist_items"].shape[0])
        users.update(batch["user_id"].tolist())
        _ = int(batch["hist_items"].sum()) + int(batch["target_items"].sum())
        if first is None:
            first, first_users = time.perf_counter() - t0, len(users)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "first_batch_s": first,
        "users": len(users),
        "samples": samples,
        "seq_per_s": len(users) / seconds,
        "steady_seq_per_s": (len(users) - first_users) / max(seconds - (first or 0.0), 1e-9),
    }


def bench_ray(data: Path, cfg, users_per_batch: int, epoch: int) -> dict:
    return consume(train_batches(read_sequences(data), cfg, epoch, users_per_batch))


def bench_pyarrow(data: Path, cfg, users_per_batch: int, epoch: int) -> dict:
    collate = TrainCollate(cfg, epoch)
    return consume(
        collate(b) for b in pq.ParquetFile(table_path(data, "sequences")).iter_batches(batch_size=users_per_batch)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out/data.json"))
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--L", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        syn = replace(SyntheticConfig.preset("small", num_users=args.users), min_len=args.L + 3, max_len=args.L + 3)
        generate_to_dir(syn, data)
        cfg = sample_config(data, max_len=args.L, num_neg=4, samples_per_user=8)
        users_per_batch = 32
        bench_ray(data, cfg, users_per_batch, epoch=99)  # warm-up: worker processes, imports
        runs: dict[str, list[dict]] = {"ray": [], "pyarrow": []}
        for rep in range(args.repeats):  # interleaved, so both see the same machine load
            runs["ray"].append(bench_ray(data, cfg, users_per_batch, rep))
            runs["pyarrow"].append(bench_pyarrow(data, cfg, users_per_batch, rep))

    def best(key: str, stat: str) -> float:
        return max(r[stat] for r in runs[key])

    out = {
        "L": args.L,
        "users": args.users,
        "samples_per_user": cfg.samples_per_user,
        "ray_data_seq_per_s": best("ray", "steady_seq_per_s"),
        "pyarrow_seq_per_s": best("pyarrow", "steady_seq_per_s"),
        "ray_data_seq_per_s_end_to_end": best("ray", "seq_per_s"),
        "pyarrow_seq_per_s_end_to_end": best("pyarrow", "seq_per_s"),
        "ray_data_first_batch_s": min(r["first_batch_s"] for r in runs["ray"]),
        "runs": runs,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
    }
    out["ratio_ray_over_pyarrow"] = out["ray_data_seq_per_s"] / out["pyarrow_seq_per_s"]
    out["ratio_ray_over_pyarrow_end_to_end"] = (
        out["ray_data_seq_per_s_end_to_end"] / out["pyarrow_seq_per_s_end_to_end"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("runs",)}, indent=1))


if __name__ == "__main__":
    main()
