"""Ray Train (1 and 2 workers) against a plain single-process PyTorch loop, at two shapes, over several epochs.

Every run trains the same model (SEMINAR CTR) on the same synthetic data with the same sampling (TrainCollate draws
epoch e's targets in both paths) and one torch thread per process:
- `small`: configs/model_small.yaml on the `small` preset (L ≤ 200, the shape of `make run`);
- the top level: configs/model_paper.yaml (d = 64, K = 200, batch 256) on the `long` preset at L = 2,000.
The plain loop reads Parquet with pyarrow and collates between steps in its one thread, as a hand-written loop
would. Ray Train reads the sequences once with Ray Data (materialised into the object store) and iterates them
every epoch.
The plain loop runs before and after Ray Train, and its figure is the mean of the two (the load drifts); it runs at
the niceness Ray gives its workers (+15), so that both get the same share of a shared machine.
Figures: samples/s = samples / training seconds over all epochs (validation and start-up excluded, the first
batch's wait included), `data_wait_share` = time waiting for batches / training time, `epoch2_first_batch_s` =
epoch 2's wait for its first batch. The ratios are the figures; the load average is recorded beside them.

    python -m bench.train_throughput [--quick] [--out bench/out/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from seminar_ray.data.entities import EntityTables
from seminar_ray.data.pipeline import TrainCollate, sample_config
from seminar_ray.data.schema import table_path
from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir
from seminar_ray.models import ModelConfig, build_model
from seminar_ray.runtime import init_ray
from seminar_ray.train.job import TrainJob, run_training
from seminar_ray.train.loop import WithLoss, make_optimizer, setup_training_process, train_one_epoch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# shape → (synthetic preset, model config, users full/quick, samples per user)
SHAPES = {
    "small": ("small", "model_small.yaml", (1500, 600), 8),
    "paper": ("long", "model_paper.yaml", (512, 256), 8),
}


def totals(epochs: list[dict]) -> dict:
    """Samples/s and data-wait share over all epochs, epoch 2's first-batch wait and the per-epoch rows."""
    seconds = sum(e["seconds"] for e in epochs)
    return {
        "samples_per_s": sum(e["samples"] for e in epochs) / seconds,
        "data_wait_share": sum(e["data_wait_share"] * e["seconds"] for e in epochs) / seconds,
        "epoch2_first_batch_s": epochs[1]["first_batch_s"],
        "epochs": [{k: round(e[k], 4) for k in ("samples_per_s", "data_wait_share", "first_batch_s")} for e in epochs],
    }


def plain_torch(data: Path, cfg: ModelConfig, epochs: int, samples_per_user: int) -> dict:
    setup_training_process(1)  # what a Ray Train worker runs with (bench/out/train.json predates it on both sides)
    net = WithLoss(build_model("seminar", cfg, EntityTables.load(data)))
    opt = make_optimizer(net, cfg.lr, cfg.weight_decay)
    scfg = sample_config(data, max_len=cfg.max_len, num_neg=cfg.n_neg, samples_per_user=samples_per_user)
    users_per_batch = max(1, cfg.batch // samples_per_user)
    rows = []
    for epoch in range(epochs):
        collate = TrainCollate(scfg, epoch=epoch)
        parquet = pq.ParquetFile(table_path(data, "sequences"))
        batches = (collate(b) for b in parquet.iter_batches(batch_size=users_per_batch))
        rows.append(train_one_epoch(net, batches, opt))
    return totals(rows)


def ray_train(data: Path, cfg: ModelConfig, epochs: int, workers: int, samples_per_user: int, storage: Path) -> dict:
    job = TrainJob(
        kind="seminar",
        data=str(data),
        storage_path=str(storage),
        run_name=f"bench_{workers}w",
        model=cfg.to_dict(),
        epochs=epochs,
        num_workers=workers,
        cpus_per_worker=0.5,
        samples_per_user=samples_per_user,
        eval_users=50,
    )
    t0 = time.time()
    history = run_training(job)["history"]
    rows = [{k.removeprefix("train_"): v for k, v in h.items() if k.startswith("train_")} for h in history]
    out = totals(rows)  # rank 0's figures; the shards are equal to within one batch, so × world size
    out["samples_per_s"] *= workers
    out["wall_s_including_startup_and_validation"] = time.time() - t0
    return out


def measure(shape: str, quick: bool, epochs: int, two_workers: bool, tmp: Path) -> dict:
    preset, config, (users_full, users_quick), spu = SHAPES[shape]
    users = users_quick if quick else users_full
    cfg = ModelConfig.from_yaml(CONFIGS / config, pretrained=False)
    data = generate_to_dir(SyntheticConfig.preset(preset, num_users=users), tmp / f"data_{shape}")
    load0 = os.getloadavg()[0]
    # the plain loop runs before and after Ray Train and counts as their mean: on a shared machine the load drifts
    before = plain_torch(data, cfg, epochs, spu)
    one = ray_train(data, cfg, epochs, 1, spu, tmp / f"runs_{shape}")
    after = plain_torch(data, cfg, epochs, spu)
    plain = {k: (before[k] + after[k]) / 2 for k in ("samples_per_s", "data_wait_share")}
    out = {
        "L": cfg.max_len,
        "batch": cfg.batch,
        "users": users,
        "samples_per_user": spu,
        "epochs": epochs,
        "ratio_ray1_over_plain": one["samples_per_s"] / plain["samples_per_s"],
        "data_wait_share": one["data_wait_share"],
        "epoch2_first_batch_s": one["epoch2_first_batch_s"],
        "data_wait_share_plain": plain["data_wait_share"],
        "ray_1_worker_samples_per_s": one["samples_per_s"],
        "plain_torch_samples_per_s": plain["samples_per_s"],
        "details": {"plain_before": before, "plain_after": after, "ray_1": one},
    }
    if two_workers:
        two = ray_train(data, cfg, epochs, 2, spu, tmp / f"runs_{shape}")
        out.update(
            ray_2_workers_samples_per_s=two["samples_per_s"],
            ratio_ray2_over_ray1=two["samples_per_s"] / one["samples_per_s"],
            data_wait_share_2_workers=two["data_wait_share"],
        )
        out["details"]["ray_2"] = two
    out["load_avg_1m"] = [load0, os.getloadavg()[0]]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="fewer users (both shapes still measured, L = 2,000 included)")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    out_path = args.out or Path("bench/out") / ("train_quick.json" if args.quick else "train.json")
    init_ray()
    # Ray starts its workers at niceness +15 (RAY_worker_niceness). On a shared machine a nice-0 plain loop would get
    # a far larger share of the CPU than the Train worker, and the ratio would measure the scheduler, not Ray: this
    # process (the plain loop) takes the workers' niceness.
    niceness = os.nice(int(os.environ.get("RAY_worker_niceness", "15")))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        small = measure("small", args.quick, args.epochs, two_workers=True, tmp=Path(tmp))
        paper = measure("paper", args.quick, args.epochs, two_workers=False, tmp=Path(tmp))
    out = {
        **paper,
        "small": small,
        "model": "seminar",
        "quick": args.quick,
        "wall_s": time.time() - t0,
        "niceness_of_plain_loop_and_ray_workers": niceness,
        "note": "2 workers on a 2-core machine share the cores with each other and with Ray: no scaling expected",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    keys = (
        "L",
        "ratio_ray1_over_plain",
        "data_wait_share",
        "epoch2_first_batch_s",
        "data_wait_share_plain",
        "ratio_ray2_over_ray1",
        "load_avg_1m",
    )
    print(json.dumps({"paper": {k: paper.get(k) for k in keys}, "small": {k: small.get(k) for k in keys}}, indent=1))


if __name__ == "__main__":
    main()
