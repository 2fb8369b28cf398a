"""open_clip feature throughput on the Ray Data actor pool: 1 vs 2 actors, text and image separately.

    python -m bench.features --out bench/out/features.json [--items 48] [--batch-size 4]

Headline keys (text|image)_items_per_s_(1|2) are wall-clock rates: all items divided by the time from asking
the pool for its first batch to receiving the last, actor start-up (importing torch, building the model)
included, which is what a user waits for. The steady-state rates (`steady_*`: items after the first batch over
the time from the first batch to the last) are secondary and flatter the larger pool: with 2 actors the second
actor's first batch mostly finishes before that window opens, so it is counted without its time. Baseline, same
run: the same encoder called in this process over the same items with one thread. Random ViT-B-32 weights (no
downloads here): speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from seminar_ray.data.features import ClipEncoder, FeatureConfig, encoder_dataset
from seminar_ray.runtime import init_ray

WORDS = "red blue cotton denim jacket summer classic leather boots vintage movie season collection".split()


def make_items(n: int, root: Path, seed: int = 0) -> pa.Table:
    """n titles of 4-8 words and n 256x256 noise PNGs (preprocessing resizes them to 224)."""
    rng = np.random.default_rng(seed)
    titles, paths = [], []
    for i in range(n):
        titles.append(" ".join(rng.choice(WORDS, size=rng.integers(4, 9))))
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return pa.table({"text": titles, "image": paths})


def pool_rate(rows: pa.Table, channel: str, actors: int, batch_size: int, root: Path) -> dict:
    cfg = FeatureConfig(pretrained=None, actors=actors, batch_size=batch_size)
    start = time.perf_counter()
    arrivals = []
    for batch in encoder_dataset(rows, (channel,), cfg, root).iter_batches(batch_format="numpy", batch_size=None):
        assert (batch[f"{channel}_status"] == "ok").all(), "every generated item must encode"
        arrivals.append((time.perf_counter(), len(batch["id"])))
    wall = time.perf_counter() - start
    steady_items = sum(k for _, k in arrivals[1:])
    steady_s = arrivals[-1][0] - arrivals[0][0]
    return {
        "items_per_s": rows.num_rows / wall,
        "steady_items_per_s": steady_items / steady_s,
        "wall_s": wall,
        "batches": len(arrivals),
    }


def baseline_rate(rows: pa.Table, channel: str, batch_size: int, root: Path) -> float:
    enc = ClipEncoder(pretrained=None, channels=(channel,), image_root=str(root))
    values = rows.column(channel).to_pylist()
    encode = enc.encode_texts if channel == "text" else enc.encode_images
    encode(values[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(values), batch_size):
        encode(values[i : i + batch_size])
    return len(values) / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out/features.json"))
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    ray = init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = 600  # dispatch only once every actor of the pool is up: a fair 1-vs-2 start
    ctx.enable_progress_bars = False
    result: dict = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = make_items(args.items, root)
        for channel in ("text", "image"):
            # titles are cheap: twice as many for a longer timing window
            rows_ch = pa.concat_tables([rows, rows]) if channel == "text" else rows
            result[f"{channel}_baseline_in_process_items_per_s"] = baseline_rate(
                rows_ch, channel, args.batch_size, root
            )
            for actors in (1, 2):
                run = pool_rate(rows_ch, channel, actors, args.batch_size, root)
                result[f"{channel}_items_per_s_{actors}"] = run.pop("items_per_s")
                result.update({f"{channel}_{k}_{actors}": v for k, v in run.items()})
                print(channel, actors, json.dumps({k: round(v, 3) for k, v in result.items()}), flush=True)
    for channel in ("text", "image"):
        base = result[f"{channel}_baseline_in_process_items_per_s"]
        result[f"{channel}_speedup_2_vs_1"] = result[f"{channel}_items_per_s_2"] / result[f"{channel}_items_per_s_1"]
        result[f"{channel}_ratio_1_actor_vs_baseline"] = result[f"{channel}_items_per_s_1"] / base
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    result["context"] = {
        "model": "ViT-B-32 (random init)",
        "image_items": args.items,
        "text_items": 2 * args.items,
        "batch_size": args.batch_size,
        "num_cpus_per_actor": FeatureConfig().num_cpus,
        "torch_threads_per_actor": 1,
        "device": "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared, noisy)",
        "headline": "wall clock: all items / time from the first request to the last batch, actor start-up included",
        "secondary": "steady_*: items after the first batch / time from first to last batch; inflates the 2-actor "
        "rate (the second actor's first batch is not timed)",
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "baseline": "same ClipEncoder in the driver process, 1 torch thread, same items and batch size",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
