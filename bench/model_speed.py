"""Training throughput of PSU and the SEMINAR CTR model at B = 256, L = 2,000, d = 64, against DIN in the same run;
the PSU against its reference implementation (bench/psu_reference.py) on the same batches; a torch.profiler roofline
of one PSU step and one CTR step against this machine's GEMM FLOP/s and memory bandwidth measured in the same
process; and the chunked alignment loss's memory for N_ch = 1, 2, 4, 8 (paper §3.3.1: O(L²/N_ch)).

Each measurement runs in its own subprocess so that its peak RSS is its own. The load average is recorded.
    .venv/bin/python -m bench.model_speed --out bench/out/model.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.psu_reference import ReferencePSU
from seminar_ray.data.entities import EntityTables
from seminar_ray.data.schema import DatasetMeta
from seminar_ray.models import ModelConfig, build_model
from seminar_ray.models.psu import alignment_loss

N_ITEMS, N_QUERIES, N_ATTRS, N_TOKENS = 20_000, 5_000, 500, 2_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def synthetic_tables(seed: int = 0) -> EntityTables:
    rng = np.random.default_rng(seed)
    n, q = N_ITEMS + 1, N_QUERIES + 1
    tokens = rng.integers(1, N_TOKENS + 1, size=(q, 6))
    tokens[:, 3:][rng.random((q, 3)) < 0.5] = 0
    tokens[0] = 0
    mask = lambda size: np.concatenate([[False], rng.random(size - 1) > 0.1])  # noqa: E731
    return EntityTables(
        item_text=rng.normal(size=(n, 512)).astype(np.float32),
        item_text_mask=mask(n),
        item_image=rng.normal(size=(n, 512)).astype(np.float32),
        item_image_mask=mask(n),
        item_attrs=rng.integers(0, N_ATTRS + 1, size=(n, 4)),
        query_tokens=tokens,
        query_text=rng.normal(size=(q, 512)).astype(np.float32),
        query_text_mask=mask(q),
        meta=DatasetMeta(
            source="bench",
            num_items=N_ITEMS,
            num_queries=N_QUERIES,
            num_attrs=N_ATTRS,
            num_tokens=N_TOKENS,
            num_users=0,
            num_behaviours=0,
        ),
    )


def synthetic_batch(b: int, length: int, c: int, seed: int) -> dict[str, torch.Tensor]:
    """Full-length histories (the worst case), 30% search behaviours, Zipf-like item popularity."""
    g = torch.Generator().manual_seed(seed)
    pop = torch.arange(1, N_ITEMS + 1, dtype=torch.float).pow(-0.8)
    items = torch.multinomial(pop, b * length, replacement=True, generator=g).view(b, length) + 1
    queries = torch.randint(1, N_QUERIES + 1, (b, length), generator=g)
    queries[torch.rand(b, length, generator=g) < 0.7] = 0
    labels = torch.zeros(b, c)
    labels[:, 0] = 1.0
    return {
        "user_id": torch.arange(b),
        "hist_items": items,
        "hist_queries": queries,
        "target_items": torch.randint(1, N_ITEMS + 1, (b, c), generator=g),
        "target_queries": torch.randint(0, N_QUERIES + 1, (b, c), generator=g),
        "labels": labels,
    }


def step_fn(model: Any) -> Callable[[dict], dict]:
    """One training step of `model` (Adam at its config's lr) on a batch; returns the loss parts."""
    opt = torch.optim.Adam(model.parameters(), lr=model.cfg.lr)

    def step(batch: dict) -> dict:
        opt.zero_grad(set_to_none=True)
        loss, parts = model.loss(batch)
        loss.backward()
        opt.step()
        return parts

    return step


def train_worker(kind: str, batch: int, length: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("paper", batch=batch, max_len=length)
    step = step_fn(build_model(kind, cfg, synthetic_tables()))
    batches = [synthetic_batch(batch, length, 1 + cfg.n_neg, seed) for seed in range(2)]
    rss_before = peak_rss_mb()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        parts = step(batches[i % 2])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    # the median step: the machine is shared, and one descheduled step should not move the figure
    return {
        "kind": kind,
        "samples_per_s": batch / float(np.median(times)),
        "mean_samples_per_s": batch * len(times) / sum(times),
        "step_s": times,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_steps_mb": rss_before,
        "last_parts": parts,
    }


def align_worker(batch: int, length: int, n_chunks: int, d: int) -> dict:
    """Forward + backward of the alignment loss alone; the logits hold B·N_ch·⌈L/N_ch⌉² floats per item pair."""
    torch.manual_seed(0)
    units = torch.nn.functional.normalize(torch.randn(batch, length, 3, d), dim=-1).requires_grad_(True)
    present = torch.ones(batch, length, 3, dtype=torch.bool)
    ids = torch.randint(1, N_ITEMS + 1, (batch, length))
    base = peak_rss_mb()
    t0 = time.perf_counter()
    alignment_loss(units, present, ids, n_chunks, 0.07).backward()
    size = math.ceil(length / n_chunks)
    return {
        "n_chunks": n_chunks,
        "logits_bytes": 4 * batch * n_chunks * size * size,
        "peak_rss_delta_mb": peak_rss_mb() - base,
        "seconds": time.perf_counter() - t0,
    }


def reference_worker(batch: int, length: int, steps: int, warmup: int) -> dict:
    """PSU and ReferencePSU from the same weights on the same batches, steps interleaved: median samples/s of each."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("paper", batch=batch, max_len=length)
    tables = synthetic_tables()
    psu = build_model("psu", cfg, tables)
    ref = ReferencePSU(cfg, tables)
    ref.load_state_dict(psu.state_dict())
    data = synthetic_batch(batch, length, 1 + cfg.n_neg, 0)
    steps_of = {"psu": step_fn(psu), "reference": step_fn(ref)}
    times: dict[str, list[float]] = {"psu": [], "reference": []}
    cpu: dict[str, list[float]] = {"psu": [], "reference": []}
    losses: dict[str, list[float]] = {"psu": [], "reference": []}
    for i in range(warmup + steps):
        for name, step in steps_of.items():
            torch.manual_seed(i)  # the relevance task's derangement: the same draw for both
            t0, c0 = time.perf_counter(), time.process_time()
            parts = step(data)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                losses[name].append(parts["loss"])
    rate = {k: batch / float(np.median(v)) for k, v in times.items()}
    # CPU seconds per step: what the step costs whatever else the shared machine runs meanwhile
    cpu_ratio = float(np.median(cpu["reference"]) / np.median(cpu["psu"]))
    return {
        "psu_samples_per_s": rate["psu"],
        "reference_samples_per_s": rate["reference"],
        "psu_speedup_vs_reference": rate["psu"] / rate["reference"],
        "psu_speedup_cpu_time": cpu_ratio,
        "step_s": times,
        "step_cpu_s": cpu,
        "losses": losses,
    }


def machine_peaks(threads: int) -> dict:
    """This process's GEMM FLOP/s (float32 2048² matmul) and memory bandwidth (a 256 MB copy: read + write)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    src, dst = torch.randn(64 << 20), torch.empty(64 << 20)

    def best(fn, reps: int = 5) -> float:
        fn()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    gemm_s = best(lambda: torch.mm(a, b))
    copy_s = best(lambda: dst.copy_(src))
    return {
        "gemm_gflops": 2 * 2048**3 / gemm_s / 1e9,
        "mem_gbps": 2 * src.numel() * 4 / copy_s / 1e9,
        "threads": threads,
    }


def profile_worker(kind: str, batch: int, length: int) -> dict:
    """torch.profiler over one training step (after a warm-up): achieved GFLOP/s (matmul FLOPs the profiler counts)
    and GB/s (bytes of every op's inputs plus what it allocated: an estimate), against the machine's peaks."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    cfg = ModelConfig.preset("paper", batch=batch, max_len=length)
    step = step_fn(build_model(kind, cfg, synthetic_tables()))
    data = synthetic_batch(batch, length, 1 + cfg.n_neg, 0)
    step(data)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True, profile_memory=True) as prof:
        t0 = time.perf_counter()
        step(data)
        seconds = time.perf_counter() - t0
    events = prof.key_averages(group_by_input_shape=True)
    flops = sum(e.flops for e in events)
    read = sum(4 * e.count * sum(math.prod(s) for s in e.input_shapes if s) for e in events if e.input_shapes)
    written = sum(max(e.self_cpu_memory_usage, 0) for e in events)
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    peaks = machine_peaks(torch.get_num_threads())
    achieved = {"gflops": flops / seconds / 1e9, "gbps": (read + written) / seconds / 1e9}
    return {
        "kind": kind,
        "step_s": seconds,
        "gflop": flops / 1e9,
        "gbytes_estimate": (read + written) / 1e9,
        **achieved,
        "arithmetic_intensity_flop_per_byte": flops / max(read + written, 1),
        "machine": peaks,
        "share_of_gemm_peak": achieved["gflops"] / peaks["gemm_gflops"],
        "share_of_mem_bandwidth": achieved["gbps"] / peaks["mem_gbps"],
        "top_ops_self_cpu_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in top},
    }


def run_worker(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out/model.json", help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps instead of 1 + 5 (median step)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--align-batch", type=int, default=16, help="B of the alignment sweep (N_ch = 1 is B·L² floats)")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, *rest = args.worker
        if name == "align":
            result = align_worker(*map(int, rest))
        elif name == "reference":
            result = reference_worker(*map(int, rest))
        elif name == "profile":
            result = profile_worker(rest[0], *map(int, rest[1:]))
        else:
            result = train_worker(name, *map(int, rest))
        print(json.dumps(result))
        return
    load0 = os.getloadavg()
    steps, warmup = (2, 1) if args.quick else (5, 1)
    shape = [str(args.batch), str(args.length), str(steps), str(warmup)]
    runs = {kind: run_worker([kind, *shape]) for kind in ("psu", "seminar", "din")}
    reference = run_worker(["reference", str(args.batch), str(args.length), str(max(steps, 4)), str(warmup)])
    roofline = {kind: run_worker(["profile", kind, str(args.batch), str(args.length)]) for kind in ("psu", "seminar")}
    align = [run_worker(["align", str(args.align_batch), str(args.length), str(n), "64"]) for n in (1, 2, 4, 8)]
    base_bytes = align[0]["logits_bytes"]
    result = {
        "psu_samples_per_s": runs["psu"]["samples_per_s"],
        "ctr_samples_per_s": runs["seminar"]["samples_per_s"],
        "din_samples_per_s": runs["din"]["samples_per_s"],
        "psu_vs_din": runs["psu"]["samples_per_s"] / runs["din"]["samples_per_s"],
        "ctr_vs_din": runs["seminar"]["samples_per_s"] / runs["din"]["samples_per_s"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs.values() if r["kind"] != "din"),
        "peak_rss_mb_by_model": {k: r["peak_rss_mb"] for k, r in runs.items()},
        "psu_speedup_vs_reference": reference["psu_speedup_vs_reference"],
        "psu_speedup_cpu_time": reference["psu_speedup_cpu_time"],
        "reference": reference,
        "roofline": roofline,
        "load_avg_1m": [load0[0], os.getloadavg()[0]],
        "L": args.length,
        "batch": args.batch,
        "d": 64,
        "heads": 4,
        "K": 200,
        "candidates": 5,
        "steps": steps,
        "warmup": warmup,
        "runs": runs,
        "alignment_memory": {
            "batch": args.align_batch,
            "L": args.length,
            "d": 64,
            "by_n_chunks": align,
            "logits_bytes_ratio_vs_nch1": {a["n_chunks"]: a["logits_bytes"] / base_bytes for a in align},
            "peak_rss_delta_ratio_vs_nch1": {
                a["n_chunks"]: a["peak_rss_delta_mb"] / max(align[0]["peak_rss_delta_mb"], 1e-9) for a in align
            },
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "2"),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    skip = ("runs", "alignment_memory", "reference", "roofline")
    print(json.dumps({k: v for k, v in result.items() if k not in skip}, indent=2))
    for kind, r in roofline.items():
        print(
            f"{kind}: {r['gflops']:.1f} GFLOP/s ({r['share_of_gemm_peak']:.0%} of GEMM peak), "
            f"{r['gbps']:.1f} GB/s ({r['share_of_mem_bandwidth']:.0%} of copy bandwidth), "
            f"top ops {r['top_ops_self_cpu_s']}"
        )


if __name__ == "__main__":
    main()
