"""Pretraining and fine-tuning on Ray Train: the TrainJob config, the worker loop and the trainer (one place)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from seminar_ray.data.entities import EntityTables
from seminar_ray.data.errors import DataError
from seminar_ray.data.schema import table_path
from seminar_ray.models import ModelConfig, build_model, restore_psu, save_checkpoint
from seminar_ray.models.checkpoint import read_checkpoint
from seminar_ray.train.checkpoints import HISTORY_FILE, METRICS_FILE, SELECT_METRIC, TRAIN_STATE_FILE, resolve_checkpoint, run_checkpoints
from seminar_ray.train.loop import WithLoss, evaluate, train_one_epoch, unwrap

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """Everything a training run needs; serialisable so Ray Train can ship it to every worker."""

    kind: str  # psu | seminar | sim | eta | twin | qin | din
    data: str
    storage_path: str  # local directory or a shared URI (s3://, gs://, an NFS path)
    run_name: str
    model: dict = field(default_factory=dict)  # ModelConfig.to_dict()
    epochs: int = 2
    num_workers: int = 0  # 0 = Ray Train local mode (in this process)
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    samples_per_user: int = 8
    max_failures: int = 2
    pretrained: str | None = None  # PSU checkpoint or run directory (seminar only)
    eval_users: int = 0  # validate on at most this many users (0 = all)
    threads: int = 1  # torch threads per worker
    fault_at_step: int = -1  # tests: SIGKILL the rank-0 worker once at this step of epoch `fault_epoch` (0-based)
    fault_epoch: int = 1

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.storage_path, self.run_name)

    def check_inputs(self) -> None:
        """Fail before any work starts: a missing table, an unknown kind, a pretrained path that is not a PSU."""
        from seminar_ray.models import MODELS

        if self.kind not in MODELS:
            raise ValueError(f"unknown model {self.kind!r}; choose from {sorted(MODELS)}")
        for name in ("items", "queries", "sequences"):
            if not table_path(self.data, name).exists():
                raise DataError(f"{table_path(self.data, name)}: missing table '{name}' (run jobs/prepare_data.py)")
        if not (Path(self.data) / "meta.json").exists():
            raise DataError(f"{Path(self.data) / 'meta.json'}: missing (run jobs/prepare_data.py)")
        if self.model_config.pretrained and self.kind == "seminar" and not self.pretrained:
            raise ValueError("the config says pretrained=true but no PSU checkpoint was given: pass --pretrained PATH "
                             "or set pretrained=false to train without pretraining")
        if self.pretrained:
            if self.kind != "seminar":
                raise ValueError(f"--pretrained restores PSU tables into 'seminar', not {self.kind!r}")
            payload = read_checkpoint(resolve_checkpoint(self.pretrained))
            if payload["kind"] != "psu":
                raise ValueError(f"{self.pretrained}: holds a '{payload['kind']}' model, --pretrained needs a 'psu' one")


def _sample_cfg(job: TrainJob):
    from seminar_ray.data.pipeline import sample_config

    cfg = job.model_config
    return sample_config(job.data, max_len=cfg.max_len, num_neg=cfg.n_neg, samples_per_user=job.samples_per_user,
                         task="psu" if job.kind == "psu" else "ctr", seed=cfg.seed)


def _load_state(net, optimizer, job: TrainJob) -> tuple[int, list[dict]]:
    """Resume from the checkpoint Ray Train hands back after a failure or a re-run with the same name.

    Ray Train's local mode (num_workers=0) keeps no checkpoints, so there we resume from the run directory.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        found = run_checkpoints(job.run_dir) if job.num_workers == 0 else []
        return _restore(net, optimizer, found[-1][0]) if found else (0, [])
    with ckpt.as_directory() as d:
        return _restore(net, optimizer, Path(d))


def _restore(net, optimizer, d: Path) -> tuple[int, list[dict]]:
    unwrap(net).load_state_dict(read_checkpoint(d)["state_dict"])
    state = torch.load(d / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    print(f"resuming from {d} after epoch {int(state['epoch']) + 1}", flush=True)
    return int(state["epoch"]) + 1, json.loads((d / HISTORY_FILE).read_text())


def _persist_local(d: str, job: TrainJob, epoch: int, keep: int = 3) -> None:
    """Local mode: copy the epoch's checkpoint into the run directory, keeping the best `keep` and the latest."""
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".checkpoint_epoch_{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(d, tmp)
    os.replace(tmp, run_dir / f"checkpoint_epoch_{epoch:04d}")
    found = run_checkpoints(run_dir)
    ranked = sorted(found[:-1], key=lambda pm: pm[1].get(SELECT_METRIC, float("-inf")), reverse=True)
    for path, _ in ranked[max(keep - 1, 0):]:
        shutil.rmtree(path)


def _save(net, cfg: ModelConfig, optimizer, epoch: int, history: list[dict], metrics: dict, job: TrainJob):
    from ray.train import Checkpoint

    d = tempfile.mkdtemp(prefix="ckpt-")
    save_checkpoint(unwrap(net), cfg, d, extra={"epoch": epoch, "data": job.data, "run_name": job.run_name})
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch}, Path(d) / TRAIN_STATE_FILE)
    (Path(d) / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    (Path(d) / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    if job.num_workers == 0:
        _persist_local(d, job, epoch)
    return Checkpoint.from_directory(d)


def _fault_hook(job: TrainJob, rank: int):
    """Tests: kill this worker process with SIGKILL once, mid-epoch, to exercise FailureConfig and resume."""
    marker = Path(job.storage_path) / f".{job.run_name}.fault-injected"
    step = [0]

    def on_step(_n: int, _loss: float) -> None:
        step[0] += 1
        if rank == 0 and step[0] == job.fault_at_step and not marker.exists():
            marker.write_text(str(step[0]))
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: build, maybe restore, train, validate, report a checkpoint each epoch."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    from seminar_ray.data.pipeline import query_pool, train_batches

    job = TrainJob(**config)
    torch.set_num_threads(job.threads)
    cfg = job.model_config
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    tables = EntityTables.load(job.data)
    model = build_model(job.kind, cfg, tables)
    if job.pretrained:
        restore_psu(model, read_checkpoint(resolve_checkpoint(job.pretrained))["state_dict"])
    net = ray.train.torch.prepare_model(WithLoss(model), parallel_strategy_kwargs={"find_unused_parameters": True})
    device = ray.train.torch.get_device()
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    start_epoch, history = _load_state(net, optimizer, job)
    sample_cfg = _sample_cfg(job)
    queries = query_pool(job.data, seed=cfg.seed) if job.kind == "psu" else None
    users_per_batch = max(1, cfg.batch // job.samples_per_user)
    shard = ray.train.get_dataset_shard("train")
    valid = ray.train.get_dataset_shard("valid")
    for epoch in range(start_epoch, job.epochs):
        bar = tqdm(desc=f"{job.run_name} epoch {epoch + 1}/{job.epochs}", unit="samples") if rank == 0 else None
        fault = _fault_hook(job, rank) if job.fault_at_step >= 0 and epoch == job.fault_epoch else None

        def on_step(n: int, loss: float) -> None:
            if bar is not None:
                bar.update(n)
            if fault is not None:
                fault(n, loss)

        stats = train_one_epoch(net, train_batches(shard, sample_cfg, epoch, users_per_batch, queries), optimizer,
                                device, on_step=on_step)
        metrics = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()}}
        checkpoint = None
        if rank == 0:
            bar.close()
            val = evaluate(net, valid.iter_torch_batches(batch_size=64), device)
            metrics.update({k: v for k, v in val.items() if isinstance(v, float)})
            metrics["valid"] = val
            history.append(metrics)
            checkpoint = _save(net, cfg, optimizer, epoch, history, metrics, job)
            print(f"[{job.run_name}] epoch {epoch + 1}/{job.epochs} loss {stats['loss']:.4f} "
                  f"{stats['samples_per_s']:.0f} samples/s data-wait {stats['data_wait_share']:.0%} "
                  f"valid ndcg@10 {val['ndcg@10']:.4f} hr@10 {val['hr@10']:.4f} auc {val['auc']:.4f}", flush=True)
        ray.train.report({k: v for k, v in metrics.items() if k != "valid"}, checkpoint=checkpoint)


def check_placement(job: TrainJob) -> None:
    """Raise before starting when no set of the cluster's nodes could ever hold `num_workers` workers."""
    import ray

    if job.num_workers == 0:
        return
    need_gpu = 1.0 if job.use_gpu else 0.0
    slots = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        by_cpu = int(res.get("CPU", 0) // job.cpus_per_worker) if job.cpus_per_worker > 0 else job.num_workers
        by_gpu = int(res.get("GPU", 0) // need_gpu) if need_gpu else by_cpu
        slots += min(by_cpu, by_gpu)
    if slots < job.num_workers:
        total = ray.cluster_resources()
        raise ValueError(
            f"--num-workers {job.num_workers} × (CPU {job.cpus_per_worker}{', GPU 1' if job.use_gpu else ''}) cannot be "
            f"placed: the cluster's nodes hold at most {slots} such workers (CPU {total.get('CPU', 0)}, "
            f"GPU {total.get('GPU', 0)}). Lower --num-workers or --cpus-per-worker, or add nodes.")


def build_trainer(job: TrainJob, train_ds=None, valid_ds=None):
    """The TorchTrainer with its ScalingConfig, RunConfig, CheckpointConfig and FailureConfig, built in one place."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from seminar_ray.data.pipeline import eval_dataset, read_sequences

    sample_cfg = _sample_cfg(job)
    train_ds = train_ds if train_ds is not None else read_sequences(job.data, min_blocks=max(8, 2 * job.num_workers))
    if valid_ds is None:
        valid_ds = eval_dataset(job.data, "valid", sample_cfg)
        if job.eval_users:
            valid_ds = valid_ds.limit(job.eval_users)
    resources = {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=job.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=3, checkpoint_score_attribute=SELECT_METRIC,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
        datasets={"train": train_ds, "valid": valid_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def run_training(job: TrainJob) -> dict:
    """Check inputs, train (resuming a run of the same name), then write metrics.json and the curves PNG."""
    from seminar_ray.train.report import write_run_summary

    job.check_inputs()
    check_placement(job)
    Path(job.storage_path).mkdir(parents=True, exist_ok=True) if "://" not in job.storage_path else None
    t0 = time.time()
    result = build_trainer(job).fit()
    if result.error:
        raise RuntimeError(f"training run {job.run_name} failed: {result.error}") from result.error
    return write_run_summary(job.run_dir, time.time() - t0)
