"""Pretraining and fine-tuning on Ray Train: the TrainJob config, the worker loop and the trainer (one place)."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from seminar_ray import storage
from seminar_ray.data.entities import EntityTables
from seminar_ray.data.errors import DataError
from seminar_ray.data.splits import EVAL_NEG, EVAL_SEED
from seminar_ray.errors import InputError
from seminar_ray.models import ModelConfig, SeminarCTR, build_model, restore_psu, save_checkpoint
from seminar_ray.models.checkpoint import read_checkpoint
from seminar_ray.runs import (
    HISTORY_FILE,
    METRICS_FILE,
    PATIENCE,
    SELECT_KEY,
    TRAIN_STATE_FILE,
    is_complete_checkpoint,
    resolve_checkpoint,
    run_checkpoints,
    selection_score,
    stops_early,
)
from seminar_ray.runtime import ensure_logging, ray_console_level
from seminar_ray.train.loop import (
    WithLoss,
    evaluate,
    make_optimizer,
    setup_training_process,
    train_one_epoch,
    unwrap,
)

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """Everything a training run needs; serialisable so Ray Train can ship it to every worker."""

    kind: str  # psu | seminar | sim | eta | twin | qin | din
    data: str  # dataset directory: local, NFS or a shared URI
    storage_path: str  # local directory or a shared URI (s3://, gs://, an NFS path)
    run_name: str
    model: dict = field(default_factory=dict)  # ModelConfig.to_dict()
    epochs: int = 2  # the cap: a CTR run stops earlier once validation has not improved for `patience` epochs
    patience: int = PATIENCE  # checkpoints.stops_early; 0 = train every epoch up to `epochs`
    num_workers: int = 0  # 0 = Ray Train local mode (in this process)
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    worker_resources: dict = field(default_factory=dict)  # extra per-worker resources, e.g. {"gpu_trainer": 0.01}
    samples_per_user: int = 0  # training targets per user per epoch; 0 = every training position
    user_level: bool = True  # user-level batches (each user's window once); False = one history copy per target
    max_failures: int = 2
    pretrained: str | None = None  # PSU checkpoint or run directory (seminar only)
    eval_users: int = 0  # validate on a fixed set of this many users, drawn by eval_seed (0 = all)
    eval_seed: int = EVAL_SEED  # validation negatives and users: the same for every model and seed
    eval_neg: int = EVAL_NEG  # sampled negatives per validation target (evaluate/compare use the same for test)
    threads: int = 1  # torch threads per worker
    # (job, rank, epoch) → a per-step callback (samples, loss) or None; pickled to every worker (tests inject faults)
    step_hook: Callable[[TrainJob, int, int], Callable[[int, float], None] | None] | None = None

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @property
    def run_dir(self) -> str:
        return str(storage.join(self.storage_path, self.run_name))

    def check_inputs(self) -> None:
        """Fail before any work starts: a missing table, an unknown kind, a pretrained path that is not a PSU."""
        from seminar_ray.models import MODELS

        if self.kind not in MODELS:
            raise InputError(f"unknown model {self.kind!r}; choose from {sorted(MODELS)}")
        for name in ("items", "queries", "sequences"):
            if not storage.exists(path := storage.join(self.data, f"{name}.parquet")):
                raise DataError(f"{path}: missing table '{name}' (run jobs/prepare_data.py)")
        if not storage.exists(path := storage.join(self.data, "meta.json")):
            raise DataError(f"{path}: missing (run jobs/prepare_data.py)")
        if self.model_config.pretrained and self.kind == "seminar" and not self.pretrained:
            raise InputError(
                "the config says pretrained=true but no PSU checkpoint was given: pass --pretrained PATH "
                "or set pretrained=false to train without pretraining"
            )
        if self.pretrained:
            if self.kind != "seminar":
                raise InputError(f"--pretrained restores PSU tables into 'seminar', not {self.kind!r}")
            payload = read_checkpoint(resolve_checkpoint(self.pretrained))
            if payload["kind"] != "psu":
                raise InputError(
                    f"{self.pretrained}: holds a '{payload['kind']}' model, --pretrained needs a 'psu' one"
                )


def _sample_cfg(job: TrainJob):
    from seminar_ray.data.pipeline import sample_config

    cfg = job.model_config
    return sample_config(
        job.data,
        max_len=cfg.max_len,
        num_neg=cfg.n_neg,
        samples_per_user=job.samples_per_user,
        task="psu" if job.kind == "psu" else "ctr",
        seed=cfg.seed,
        eval_seed=job.eval_seed,
        eval_neg=job.eval_neg,
    )


def _load_state(net, optimizer, job: TrainJob) -> tuple[int, list[dict]]:
    """Resume from the newest complete checkpoint: the one Ray Train hands back after a failure or a re-run with the
    same name, or a newer one in the run directory.

    Ray Train registers a reported checkpoint asynchronously, so a worker killed just after `report` restarts with
    the previous checkpoint (or none) although the newer one was written in full; Ray Train's local mode
    (num_workers=0) keeps no checkpoints at all. Both cases resume from the run directory.
    """
    import ray.train

    on_disk = [(d, m) for d, m in run_checkpoints(job.run_dir) if is_complete_checkpoint(d)]
    newest = on_disk[-1] if on_disk else None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            ray_epoch = json.loads((Path(d) / METRICS_FILE).read_text()).get("epoch", 0)
            if newest is None or newest[1].get("epoch", 0) <= ray_epoch:
                return _restore(net, optimizer, Path(d))
    return _restore(net, optimizer, storage.local_dir(newest[0])) if newest else (0, [])


def _restore(net, optimizer, d: Path) -> tuple[int, list[dict]]:
    unwrap(net).load_state_dict(read_checkpoint(d)["state_dict"])
    state = torch.load(d / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s after epoch %d", d, int(state["epoch"]) + 1)
    return int(state["epoch"]) + 1, json.loads((d / HISTORY_FILE).read_text())


def _persist_local(d: str, job: TrainJob, epoch: int, keep: int = 3) -> None:
    """Local mode: copy the epoch's checkpoint into the run directory, keeping the best `keep` and the latest."""
    storage.copy_dir(d, storage.join(job.run_dir, f"checkpoint_epoch_{epoch:04d}"))
    found = run_checkpoints(job.run_dir)
    ranked = sorted(found[:-1], key=lambda pm: pm[1][SELECT_KEY], reverse=True)
    for path, _ in ranked[max(keep - 1, 0) :]:
        storage.delete_dir(path)


def _save(net, cfg: ModelConfig, optimizer, epoch: int, history: list[dict], metrics: dict, job: TrainJob, d: str):
    """Write the epoch's checkpoint into the (temporary) directory `d`; in local mode also into the run directory."""
    from ray.train import Checkpoint

    save_checkpoint(unwrap(net), cfg, d, extra={"epoch": epoch, "data": job.data, "run_name": job.run_name})
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch}, Path(d) / TRAIN_STATE_FILE)
    (Path(d) / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    (Path(d) / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    if job.num_workers == 0:
        _persist_local(d, job, epoch)
    return Checkpoint.from_directory(d)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: build, maybe restore, train, validate, report a checkpoint each epoch."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    from seminar_ray.data.pipeline import query_pool, shuffle_users, train_batches, users_per_step

    ensure_logging()  # the per-epoch line below is an INFO record; Ray forwards this process's stderr
    job = TrainJob(**config)
    setup_training_process(job.threads)
    cfg = job.model_config
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    data = str(storage.local_dir(job.data))  # a URI is mirrored once per node; Ray Data reads it directly
    tables = EntityTables.load(data)
    model = build_model(job.kind, cfg, tables)
    if job.pretrained:
        restore_psu(cast(SeminarCTR, model), read_checkpoint(resolve_checkpoint(job.pretrained))["state_dict"])
    net = ray.train.torch.prepare_model(WithLoss(model), parallel_strategy_kwargs={"find_unused_parameters": True})
    device = ray.train.torch.get_device()
    optimizer = make_optimizer(net, cfg.lr, cfg.weight_decay)
    start_epoch, history = _load_state(net, optimizer, job)
    sample_cfg = _sample_cfg(job)
    queries = query_pool(data, seed=cfg.seed) if job.kind == "psu" else None
    users_per_batch = users_per_step(data, job.samples_per_user, cfg.batch)
    targets_per_row = min(cfg.batch, cfg.max_len) if job.user_level else 0  # windows of at most L + batch columns
    buffer = shuffle_users(data)
    shard = ray.train.get_dataset_shard("train")
    valid = ray.train.get_dataset_shard("valid")
    for epoch in range(start_epoch, job.epochs):
        if _agreed(rank == 0 and stops_early(history, job.patience)):  # rank 0 holds the validation history
            log.info(f"[{job.run_name}] stopped after epoch {epoch}: no better ndcg@10 in {job.patience} epochs")
            break
        bar = tqdm(desc=f"{job.run_name} epoch {epoch + 1}/{job.epochs}", unit="samples") if rank == 0 else None
        hook = job.step_hook(job, rank, epoch) if job.step_hook is not None else None
        try:
            stats = train_one_epoch(
                net,
                train_batches(
                    shard,
                    sample_cfg,
                    epoch,
                    users_per_batch,
                    queries,
                    targets_per_row=targets_per_row,
                    shuffle_users=buffer,
                ),
                optimizer,
                device,
                on_step=_on_step(bar, hook),
            )
        finally:
            _close_bar(bar)
        metrics = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()}, "worker_nodes": _worker_nodes()}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue
        with tempfile.TemporaryDirectory(prefix="ckpt-") as d:  # local mode copied it into the run directory
            val = evaluate(net, valid.iter_torch_batches(batch_size=64), device)
            metrics.update({k: v for k, v in val.items() if isinstance(v, float)})
            metrics.update(
                valid=val, eval_seed=job.eval_seed, eval_neg=job.eval_neg, valid_candidates=val["candidates_digest"]
            )
            metrics[SELECT_KEY] = selection_score(job.kind, metrics)
            history.append(metrics)
            checkpoint = _save(net, cfg, optimizer, epoch, history, metrics, job, d)
            log.info(
                f"[{job.run_name}] epoch {epoch + 1}/{job.epochs} loss {stats['loss']:.4f} "
                f"{stats['samples_per_s']:.0f} samples/s data-wait {stats['data_wait_share']:.0%} "
                f"valid ndcg@10 {val['ndcg@10']:.4f} hr@10 {val['hr@10']:.4f} auc {val['auc']:.4f}"
            )
            ray.train.report({k: v for k, v in metrics.items() if k != "valid"}, checkpoint=checkpoint)


def _agreed(decision: bool) -> bool:
    """Rank 0's decision, on every rank (a collective: every worker calls it), so that all stop at the same epoch and
    reach the same `ray.train.report` calls."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _on_step(bar, hook: Callable[[int, float], None] | None) -> Callable[[int, float], None]:
    def on_step(n: int, loss: float) -> None:
        if bar is not None:
            bar.update(n)
        if hook is not None:
            hook(n, loss)

    return on_step


def _close_bar(bar) -> None:
    """Close an epoch's tqdm_ray bar and flush its final state: a worker's stdout is how the driver learns a bar
    closed, and a state left in the buffer when the worker exits leaves the driver redrawing the bar forever."""
    if bar is not None:
        bar.close()
        sys.stdout.flush()


def _worker_nodes() -> list[str]:
    """The Ray node id of every worker, by rank (a collective: every worker calls it), recorded in the history."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def _node_capacities() -> tuple[list[tuple[dict, int]], str]:
    """(resources of a node, how many such nodes) over every node the cluster has or could launch, and a description
    of where that came from. An autoscaler's node types count with their max counts: Ray's own table where it
    publishes one (KubeRay, autoscaler v2), else the table seminar_ray.autoscaling publishes (cluster.yaml's head,
    the local fake cluster) plus the head; otherwise the live nodes."""
    import ray

    # Ray 2.60 has no public API for the autoscaler's node types (ray.util.state and ray.autoscaler.sdk list live
    # nodes and demands only; Ray Data reads them the same way), so this private call stays: the training job's
    # only one.
    from ray._private.state import state

    from seminar_ray.autoscaling import published_node_types

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return (
            [(dict(g.resources), g.max_count if g.max_count >= 0 else 1 << 20) for g in config.node_group_configs],
            "the autoscaler's node types",
        )
    live = [n for n in ray.nodes() if n.get("Alive")]
    types = published_node_types()
    if types:
        head = [(n.get("Resources", {}), 1) for n in live if "node:__internal_head__" in n.get("Resources", {})]
        listed = ", ".join(f"{t['name']} (up to {t['max_count']}: {t['resources']})" for t in types)
        return head + [(t["resources"], t["max_count"]) for t in types], f"the head and the node types {listed}"
    return [(n.get("Resources", {}), 1) for n in live], "the live nodes"


def check_placement(job: TrainJob) -> None:
    """Raise before starting when no set of the cluster's nodes could ever hold `num_workers` workers."""
    import ray

    if job.num_workers == 0:
        return
    need = {k: v for k, v in worker_resources(job).items() if v > 0}
    capacities, source = _node_capacities()
    slots = sum(
        count * min((int(res.get(k, 0) // v) for k, v in need.items()), default=job.num_workers)
        for res, count in capacities
    )
    if slots < job.num_workers:
        total = ray.cluster_resources()
        have = ", ".join(f"{k} {total.get(k, 0)}" for k in need)
        raise InputError(
            f"--num-workers {job.num_workers} × {need} cannot be placed: {source} hold at most {slots} "
            f"such workers (live now: {have}). Lower --num-workers, --cpus-per-worker or --worker-resources, or add "
            f"nodes (on an autoscaling cluster, a node type that provides them)."
        )


def worker_resources(job: TrainJob) -> dict[str, float]:
    """What each Ray Train worker asks for: CPUs, a GPU with --use-gpu, and the custom resources that steer it
    to a node type (cluster.yaml: {"gpu_trainer": 0.01})."""
    for name, amount in job.worker_resources.items():
        if name in ("CPU", "GPU") or not isinstance(amount, (int, float)) or amount < 0:
            raise InputError(
                f"--worker-resources: {name}={amount!r}; give custom resources with amounts ≥ 0 "
                f"(CPU and GPU come from --cpus-per-worker and --use-gpu)"
            )
    return {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {}), **job.worker_resources}


def build_trainer(job: TrainJob, train_ds=None, valid_ds=None):
    """The TorchTrainer with its ScalingConfig, RunConfig, CheckpointConfig and FailureConfig, built in one place."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from seminar_ray.data.pipeline import eval_dataset, pick_eval_users, training_users

    sample_cfg = _sample_cfg(job)
    # Both datasets are read once into Ray's object store (which spills to disk past its memory), not re-read from
    # Parquet by every epoch: the sequences are ids only and each epoch draws its own targets from them (TrainCollate);
    # the validation rows are the same every epoch. A lazy read cost every epoch seconds of start-up before its first
    # batch (bench/train_throughput.py).
    # Enough blocks that every worker's shard gets users, in a new order each epoch (pipeline.training_users); one
    # consumer needs no repartition (an all-to-all step).
    if train_ds is None:
        min_blocks = 4 * job.num_workers if job.num_workers > 1 else 1
        train_ds = training_users(job.data, min_blocks=min_blocks, seed=job.model_config.seed)
    if valid_ds is None:  # the same users and candidates every epoch (eval_users drawn once by eval_seed)
        users = pick_eval_users(job.data, job.eval_users, job.eval_seed) if job.eval_users else None
        valid_ds = eval_dataset(job.data, "valid", sample_cfg, users).materialize()
    resources = worker_resources(job)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        # mypy reads ray.train.RunConfig as the Train V1 class; Train V2 (the default in Ray 2.60) has logging_config
        run_config=RunConfig(  # type: ignore[call-arg]
            name=job.run_name,
            storage_path=job.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=3, checkpoint_score_attribute=SELECT_KEY, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=job.max_failures),
            logging_config=LoggingConfig(log_level=ray_console_level()),  # Ray Train's lines (all in its files)
        ),
        datasets={"train": train_ds, "valid": valid_ds},
        # one worker reads the whole dataset: no streaming split, whose coordinator actor costs seconds at start
        dataset_config=DataConfig(datasets_to_split=["train"] if job.num_workers > 1 else []),
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
    return write_run_summary(job.run_dir, time.time() - t0, patience=job.patience, max_epochs=job.epochs)
