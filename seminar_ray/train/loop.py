"""The training and evaluation loops, outside the models (ReChorus style) and free of Ray."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from seminar_ray.data.splits import candidates_digest
from seminar_ray.memory import keep_freed_memory
from seminar_ray.metrics import evaluate_scores
from seminar_ray.models.layers import is_user_level, num_targets

Batch = dict[str, torch.Tensor]


class WithLoss(nn.Module):
    """forward = model.loss, so that DistributedDataParallel's forward sees the loss computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model: Any = model  # a PSU or a LifelongCTR: both have loss(batch)

    def forward(self, batch: Batch):
        return self.model.loss(batch)


def unwrap(net: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel and WithLoss wrappers."""
    while isinstance(net, WithLoss) or hasattr(net, "module"):
        net = net.model if isinstance(net, WithLoss) else cast(nn.Module, net.module)
    return net


def setup_training_process(threads: int, trim_mb: int = 1024) -> None:
    """What every training process runs with: `threads` intra-op threads, and malloc keeping a step's freed
    activations for the next step (no fresh mappings, up to `trim_mb` kept at the top of the heap) instead of
    faulting them in again: 1.4-1.9× less CPU per target at L = 2,000 (docs/scaling.md, "Memory of a training
    worker")."""
    torch.set_num_threads(threads)
    keep_freed_memory(trim_mb=trim_mb, mmap_mb=None)


def make_optimizer(net: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The paper's Adam (§4.1), or AdamW with decoupled weight decay when `weight_decay` > 0 (ModelConfig)."""
    if weight_decay > 0:
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(net.parameters(), lr=lr)


MICRO_CELLS = 1 << 19  # (target, history column) pairs per micro-batch: ~256 targets at L = 2,000


def micro_batches(batch: Batch, max_cells: int = MICRO_CELLS) -> list[Batch]:
    """A batch split along its rows into parts of at most `max_cells` (target, column) pairs, what its activations
    grow with (a row bigger than that stays whole), so that a step's memory is bounded whatever its users' lengths.
    A user-level part drops the leading window columns that are padding in all of its rows."""
    history = batch.get("seq_items" if is_user_level(batch) else "hist_items")
    width = 1 if history is None else history.shape[1]
    counts = batch["target_valid"].sum(1).tolist() if is_user_level(batch) else [1] * len(batch["labels"])
    parts, start, size = [], 0, 0
    for row, n in enumerate(counts):
        if size and (size + n) * width > max_cells:
            parts.append((start, row))
            start, size = row, 0
        size += n
    parts.append((start, len(counts)))
    return [_trim({k: v[a:b] for k, v in batch.items()}) for a, b in parts]


def _trim(batch: Batch) -> Batch:
    if not is_user_level(batch):
        return batch
    used = (batch["seq_items"] != 0).any(0)
    first = int(used.to(torch.uint8).argmax()) if bool(used.any()) else 0
    if first == 0:
        return batch
    return {
        **batch,
        "seq_items": batch["seq_items"][:, first:],
        "seq_queries": batch["seq_queries"][:, first:],
        "target_pos": (batch["target_pos"] - first).clamp(min=0),
    }


def _step(net: nn.Module, batch: Batch, max_cells: int, step: int) -> tuple[Tensor, dict[str, float], int]:
    """Forward and backward of one optimizer step, its micro-batches' gradients accumulated as the gradient of the
    mean over all the step's targets; DDP synchronises once, on the last micro-batch. (loss, parts, targets)."""
    parts = micro_batches(batch, max_cells)
    counts = [num_targets(p) for p in parts]
    total = max(sum(counts), 1)
    sums: dict[str, float] = defaultdict(float)
    loss_sum = torch.zeros(())
    for i, (part, n) in enumerate(zip(parts, counts)):
        sync = i == len(parts) - 1 or not hasattr(net, "no_sync")
        with contextlib.nullcontext() if sync else net.no_sync():  # type: ignore[operator]
            loss, part_parts = net(part)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}: lower the learning rate?")
            (loss * (n / total)).backward()
        loss_sum = loss_sum + loss.detach().cpu() * n
        for k, v in part_parts.items():
            sums[k] += float(v) * n
    return loss_sum / total, {k: v / total for k, v in sums.items()}, sum(counts)


def train_one_epoch(
    net: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    grad_clip: float = 5.0,
    max_cells: int = MICRO_CELLS,
) -> dict[str, float]:
    """One pass of `net` (a WithLoss, maybe under DDP) over `batches`, one optimizer step per batch, in
    micro-batches of at most `max_cells` (target, history column) pairs: mean loss and parts, samples (targets)/s,
    data-wait share and the wait for the first batch (an epoch's start-up cost)."""
    net.train()
    sums: dict[str, float] = defaultdict(float)
    samples, steps, wait, first_batch = 0, 0, 0.0, 0.0
    start = tick = time.perf_counter()
    for batch in batches:
        wait += time.perf_counter() - tick
        first_batch = first_batch or time.perf_counter() - start
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        loss, parts, n = _step(net, batch, max_cells, steps)
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
        samples, steps = samples + n, steps + 1
        for k, v in parts.items():  # parts hold "loss" too (model.loss's contract)
            sums[k] += float(v) * n
        if on_step is not None:
            on_step(n, float(loss))
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    out = {k: v / max(samples, 1) for k, v in sums.items()}
    out.update(
        samples=samples,
        steps=steps,
        seconds=seconds,
        samples_per_s=samples / max(seconds, 1e-9),
        data_wait_share=wait / max(seconds, 1e-9),
        first_batch_s=first_batch,
    )
    return out


@torch.no_grad()
def score_batches(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu"):
    """(user ids, target queries [targets, C], target items [targets, C], scores [targets, C], history lengths
    [targets] or None where the batches carry none) of every batch."""
    net = unwrap(model).eval()
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        parts["scores"].append(net(batch).float().cpu().numpy())
        for key in ("user_id", "target_queries", "target_items"):
            parts[key].append(batch[key].cpu().numpy())
        if "history_length" in batch:  # evaluation rows (splits.eval_batch) carry it
            parts["history_length"].append(batch["history_length"].cpu().numpy())
    if not parts["scores"]:
        raise ValueError("no evaluation targets: every user needs at least 3 behaviours")
    out = tuple(np.concatenate(parts[k]) for k in ("user_id", "target_queries", "target_items", "scores"))
    return (*out, np.concatenate(parts["history_length"]) if parts["history_length"] else None)


def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict:
    """HR/NDCG@K, MRR, AUC and gAUC, overall, per target type and per history length (seminar_ray.metrics), and the
    candidate lists' digest (`candidates_digest`), which shows that two evaluations ranked the same users' same
    candidates."""
    users, queries, items, scores, lengths = score_batches(model, batches, device)
    return {**evaluate_scores(users, queries, scores, lengths), "candidates_digest": candidates_digest(users, items)}
