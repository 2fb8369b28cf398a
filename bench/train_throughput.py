"""Training samples/s with 1 and 2 Ray Train workers against a plain single-process PyTorch loop.

All three train the same model (SEMINAR CTR, configs/model_small.yaml) for one epoch on the same data
with one torch thread per process; the plain loop reads Parquet with pyarrow and samples in-process.
The ratios are the figures. `data_wait_share` is the share of a worker's epoch spent waiting for batches.
Ray's rate is rank 0's samples/s × world size (the shards are equal to within one batch).

    python bench/train_throughput.py --out bench/out/train.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import torch


from seminar_ray.data.entities import EntityTables
from seminar_ray.data.pipeline import TrainCollate, sample_config
from seminar_ray.data.schema import table_path
from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir
from seminar_ray.models import ModelConfig, build_model
from seminar_ray.runtime import init_ray
from seminar_ray.train.job import TrainJob, run_training
from seminar_ray.train.loop import WithLoss, train_one_epoch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model_small.yaml"


def plain_torch(data: Path, cfg: ModelConfig, samples_per_user: int) -> dict:
    torch.set_num_threads(1)
    net = WithLoss(build_model("seminar", cfg, EntityTables.load(data)))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    scfg = sample_config(data, max_len=cfg.max_len, num_neg=cfg.n_neg, samples_per_user=samples_per_user)
    collate = TrainCollate(scfg, epoch=0)
    users_per_batch = max(1, cfg.batch // samples_per_user)
    batches = (collate(b) for b in pq.ParquetFile(table_path(data, "sequences")).iter_batches(batch_size=users_per_batch))
    stats = train_one_epoch(net, batches, opt)
    return {"samples_per_s": stats["samples_per_s"], "data_wait_share": stats["data_wait_share"],
            "samples": stats["samples"]}


def ray_train(data: Path, cfg: ModelConfig, workers: int, samples_per_user: int, storage: Path) -> dict:
    job = TrainJob(kind="seminar", data=str(data), storage_path=str(storage), run_name=f"bench_{workers}w",
                   model=cfg.to_dict(), epochs=1, num_workers=workers, cpus_per_worker=0.5,
                   samples_per_user=samples_per_user, eval_users=50)
    t0 = time.time()
    h = run_training(job)["history"][0]
    return {"samples_per_s": h["train_samples_per_s"] * workers, "rank0_samples_per_s": h["train_samples_per_s"],
            "data_wait_share": h["train_data_wait_share"], "samples_rank0": h["train_samples"],
            "wall_s_including_startup": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out/train.json"))
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--samples-per-user", type=int, default=8)
    args = p.parse_args()
    init_ray()
    cfg = ModelConfig.from_yaml(CONFIG, pretrained=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_to_dir(replace(SyntheticConfig.preset("small", num_users=args.users)), Path(tmp) / "data")
        plain = plain_torch(data, cfg, args.samples_per_user)
        one = ray_train(data, cfg, 1, args.samples_per_user, Path(tmp) / "runs")
        two = ray_train(data, cfg, 2, args.samples_per_user, Path(tmp) / "runs")
    out = {
        "ray_1_worker_samples_per_s": one["samples_per_s"], "ray_2_workers_samples_per_s": two["samples_per_s"],
        "plain_torch_samples_per_s": plain["samples_per_s"],
        "data_wait_share": one["data_wait_share"], "data_wait_share_2_workers": two["data_wait_share"],
        "data_wait_share_plain": plain["data_wait_share"],
        "ratio_ray1_over_plain": one["samples_per_s"] / plain["samples_per_s"],
        "ratio_ray2_over_ray1": two["samples_per_s"] / one["samples_per_s"],
        "model": "seminar", "config": cfg.to_dict(), "users": args.users, "samples_per_user": args.samples_per_user,
        "details": {"plain": plain, "ray_1": one, "ray_2": two},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("config", "details")}, indent=1))


if __name__ == "__main__":
    main()
