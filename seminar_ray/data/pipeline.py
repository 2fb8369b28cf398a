"""The Ray Data pipeline: read_parquet of sequences → training / evaluation samples → torch batches.

Rows stay sequences of ids: entity features are looked up by the model. Training targets are a
function of (seed, epoch, user), so a Ray Data dataset is built once and each epoch's targets are
drawn by `TrainCollate(epoch)` from the Arrow batch of user sequences that a Ray Train worker takes
from its shard: `get_dataset_shard("train").iter_torch_batches(collate_fn=TrainCollate(...))`. Training
batches are user-level (each user's window once, every target of it scored in one pass; splits.user_batch).
Evaluation samples are fixed, so they are drawn inside the dataset by `map_batches`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from seminar_ray import storage
from seminar_ray.data.errors import DataError
from seminar_ray.data.schema import DatasetMeta, table_path
from seminar_ray.data.splits import SampleConfig, SequenceBatch, eval_batch, eval_users, train_batch, user_batch

MAP_CPUS = 0.25  # fractional CPU for every map task: a 1-CPU task starves Train workers on 2 cores
MAP_CONCURRENCY = 2  # ... and a cap, or 0.25-CPU tasks start 16 worker processes that each import torch
ID_COLUMNS = ("user_id", "query_ids", "item_ids")  # what SequenceBatch reads of the sequences table
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"  # read by read_parquet() in the calling process
# Training visits users in a new random order every epoch (`training_users`, `train_batches`): the blocks in a
# seeded random order, then rows mixed in a local shuffle buffer of `shuffle_users` users, all of a small dataset.
# Files are often sorted by user id, and ids follow sign-up time: in file order, a model fits the last users' items
# and forgets the first ones' within an epoch (docs/results.md, Amazon Video Games). No repartition for it: an
# all-to-all step asks for whole CPUs, which on an autoscaling cluster launches a node (tests/test_autoscaling.py).
SHUFFLE_BEHAVIOURS = 1 << 23  # behaviours the shuffle buffer holds at most: ~130 MB of ids


def map_compute():
    """The task pool of every stateless map here: at most MAP_CONCURRENCY tasks at once."""
    import ray.data

    return ray.data.TaskPoolStrategy(size=MAP_CONCURRENCY)


def sample_config(data_dir: str | Path, **overrides) -> SampleConfig:
    """A SampleConfig whose item range comes from the dataset's meta.json."""
    if overrides.get("eval_neg", 1) < 1:
        from seminar_ray.errors import InputError

        raise InputError(f"--eval-neg {overrides['eval_neg']}: each evaluation target needs at least 1 negative")
    return SampleConfig(num_items=DatasetMeta.load(data_dir).num_items, **overrides)


def read_sequences(data_dir: str | Path, min_blocks: int = 8):
    """The sequences table as a Ray Dataset (one row per user), in at least `min_blocks` blocks so it shards."""
    import ray.data

    path = storage.join(data_dir, "sequences.parquet")  # a shared URI is read in place by every node
    if not storage.exists(path):
        raise DataError(f"{path}: missing table 'sequences'")
    # Ray 2.60 lists Parquet files on a pool of FooterReader actors: 32 per read whatever the file count, each placed
    # with 1 CPU. For our one file that is 31 idle processes and, on an autoscaling cluster, 32 CPUs of pending demand
    # that the autoscaler answers with nodes (docs/scaling.md). One, unless the environment says otherwise.
    os.environ.setdefault(FOOTER_ACTORS_ENV, "1")
    # A fraction of a CPU and a cap, like the maps: uncapped, 16 read tasks of 0.25 CPU start at once on 4 logical
    # CPUs, each a ~1 GB process at the large preset (docs/results.md). Only the id columns: timestamps are a third of
    # the bytes and no training or evaluation step reads them.
    ds = ray.data.read_parquet(str(path), columns=list(ID_COLUMNS), num_cpus=MAP_CPUS, concurrency=MAP_CONCURRENCY)
    with storage.open_input(path) as f:
        row_groups = pq.ParquetFile(f).metadata.num_row_groups
    return ds.repartition(min_blocks) if row_groups < min_blocks else ds


def training_users(data_dir: str | Path, min_blocks: int, seed: int):
    """The sequences as a materialised Dataset of at least `min_blocks` blocks, read once, whose block order is a new
    seeded random order in each execution (each epoch)."""
    import ray.data

    users = read_sequences(data_dir, min_blocks=min_blocks).materialize()
    return users.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))


def shuffle_users(data_dir: str | Path) -> int:
    """Users in a training epoch's shuffle buffer: every user when they hold at most SHUFFLE_BEHAVIOURS behaviours
    (MovieLens-100K, Amazon Games), else as many as do (~5,600 users of the `large` preset)."""
    meta = DatasetMeta.load(data_dir)
    per_user = max(meta.num_behaviours / max(meta.num_users, 1), 1.0)
    return max(1, min(meta.num_users, int(SHUFFLE_BEHAVIOURS / per_user)))


def query_pool(data_dir: str | Path, size: int = 100_000, seed: int = 0) -> np.ndarray:
    """A sample of behaviours' query ids (0 included at its base rate): PSU's negative-query distribution."""
    ids = pa.compute.list_flatten(pq.read_table(table_path(data_dir, "sequences"), columns=["query_ids"]).column(0))
    ids = ids.to_numpy()
    if len(ids) > size:
        ids = np.random.default_rng(seed).choice(ids, size=size, replace=False)
    return ids.astype(np.int64)


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class TrainCollate(ArrowBatchCollateFn):
    """Arrow batch of user sequences → this epoch's training targets as torch tensors: a user-level batch (each
    user's window once, `targets_per_row` targets per row) or, with targets_per_row 0, a per-target batch (each
    target with its own copy of its history; models/__init__.py)."""

    def __init__(self, cfg: SampleConfig, epoch: int, queries: np.ndarray | None = None, targets_per_row: int = 0):
        self.cfg, self.epoch, self.queries, self.targets_per_row = cfg, epoch, queries, targets_per_row

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:  # type: ignore[override]  # Ray's alias is narrower
        seqs = SequenceBatch.from_arrow(batch)
        if self.targets_per_row > 0:
            return to_torch(user_batch(seqs, self.cfg, self.epoch, self.targets_per_row, self.queries))
        return to_torch(train_batch(seqs, self.cfg, self.epoch, self.queries))


class _EvalSamples:
    def __init__(self, cfg: SampleConfig, split: str, users: np.ndarray | None):
        self.cfg, self.split, self.users = cfg, split, users

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return eval_batch(SequenceBatch.from_arrow(batch), self.split, self.cfg, self.users)


def pick_eval_users(data_dir: str | Path, n: int, eval_seed: int) -> np.ndarray | None:
    """The fixed user set of `n` evaluable users (eval_users), read from the sequences table; None = all users."""
    table = pq.read_table(table_path(data_dir, "sequences"), columns=["user_id", "item_ids"])
    return eval_users(
        table.column("user_id").to_numpy(),
        pa.compute.list_value_length(table.column("item_ids")).to_numpy(),
        n,
        eval_seed,
    )


def eval_dataset(data_dir: str | Path, split: str, cfg: SampleConfig, users: np.ndarray | None = None):
    """One row per user (of `users` when given): its validation or test target with 99 negatives sharing its query.

    The rows depend on (cfg.eval_seed, users) only, never on block order or the model's seed.
    """
    return read_sequences(data_dir).map_batches(
        _EvalSamples(cfg, split, users),
        batch_format="pyarrow",
        batch_size=256,
        num_cpus=MAP_CPUS,
        compute=map_compute(),
    )


def train_batches(
    ds,
    cfg: SampleConfig,
    epoch: int,
    users_per_batch: int,
    queries: np.ndarray | None = None,
    prefetch_batches: int = 2,
    targets_per_row: int = 0,
    shuffle_users: int = 1024,
):
    """Iterate one epoch of training batches from a Dataset or a DataIterator (a Train worker's shard): user-level
    when targets_per_row > 0, else per-target (TrainCollate); users mixed in a buffer of `shuffle_users`, in an
    order seeded by (cfg.seed, epoch)."""
    return ds.iter_torch_batches(
        batch_size=users_per_batch,
        collate_fn=TrainCollate(cfg, epoch, queries, targets_per_row),
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_users,
        local_shuffle_seed=cfg.seed * 1_000_003 + epoch,
    )


def users_per_step(data_dir: str | Path, samples_per_user: int, targets_per_step: int) -> int:
    """Users per optimizer step so that a step trains about `targets_per_step` targets: each user gives
    `samples_per_user` of its N - 3 training positions (all of them when 0), N averaged over the dataset."""
    meta = DatasetMeta.load(data_dir)
    per_user = max(meta.num_behaviours / max(meta.num_users, 1) - 3.0, 1.0)
    if samples_per_user > 0:
        per_user = min(per_user, float(samples_per_user))
    return max(1, round(targets_per_step / per_user))
