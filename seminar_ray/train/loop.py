"""The training and evaluation loops, outside the models (ReChorus style) and free of Ray."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from seminar_ray.data.splits import candidates_digest
from seminar_ray.metrics import evaluate_scores

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


def train_one_epoch(
    net: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    grad_clip: float = 5.0,
) -> dict[str, float]:
    """One pass of `net` (a WithLoss, maybe under DDP) over `batches`: mean loss and parts, samples/s, data-wait
    share and the wait for the first batch (an epoch's start-up cost)."""
    net.train()
    sums: dict[str, float] = defaultdict(float)
    samples, steps, wait, first_batch = 0, 0, 0.0, 0.0
    start = tick = time.perf_counter()
    for batch in batches:
        wait += time.perf_counter() - tick
        first_batch = first_batch or time.perf_counter() - start
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss, parts = net(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {steps}: lower the learning rate?")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
        n = int(batch["labels"].shape[0])
        samples, steps = samples + n, steps + 1
        for k, v in parts.items():  # parts hold "loss" too (model.loss's contract)
            sums[k] += float(v) * n
        if on_step is not None:
            on_step(n, float(loss.detach()))
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
    """(user ids, target queries [targets, C], target items [targets, C], scores [targets, C]) of every batch."""
    net = unwrap(model).eval()
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        parts["scores"].append(net(batch).float().cpu().numpy())
        for key in ("user_id", "target_queries", "target_items"):
            parts[key].append(batch[key].cpu().numpy())
    if not parts["scores"]:
        raise ValueError("no evaluation targets: every user needs at least 3 behaviours")
    return tuple(np.concatenate(parts[k]) for k in ("user_id", "target_queries", "target_items", "scores"))


def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict:
    """HR/NDCG@K, MRR, AUC and gAUC, overall and per target type (seminar_ray.metrics), and the candidate lists'
    digest (`candidates_digest`), which shows that two evaluations ranked the same users' same candidates."""
    users, queries, items, scores = score_batches(model, batches, device)
    return {**evaluate_scores(users, queries, scores), "candidates_digest": candidates_digest(users, items)}
