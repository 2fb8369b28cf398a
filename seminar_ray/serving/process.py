"""Settings of a serving process (a Retriever or Scorer replica, or the benchmark's in-process reference)."""

from __future__ import annotations

from seminar_ray.memory import keep_freed_memory


def one_compute_thread() -> None:
    """Replicas are the unit of parallelism (fractional CPUs, autoscaling): no thread pools inside one."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def setup_serving_process() -> None:
    """What every replica (and the in-process reference it is compared against) runs with."""
    one_compute_thread()
    keep_freed_memory()
