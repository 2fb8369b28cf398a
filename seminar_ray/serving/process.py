"""Settings of a serving process (a Retriever or Scorer replica, or the benchmark's in-process reference)."""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt(3) parameters


def one_compute_thread() -> None:
    """Replicas are the unit of parallelism (fractional CPUs, autoscaling): no thread pools inside one."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def keep_freed_memory(trim_mb: int = 64, mmap_mb: int = 32) -> bool:
    """glibc: keep up to `trim_mb` of freed memory at the top of each malloc arena, and serve allocations below
    `mmap_mb` from the arenas rather than from fresh mappings. False (and nothing changed) on other C libraries.

    A request allocates and frees a few MB of arrays (GSU scores [C, L] fp32, their argpartition [C, L] int64; a
    batched top-K [B, C, K] int64). With glibc's defaults the malloc arena of a thread can hand those pages back after
    every request and take them again, zero-filled, on the next, so a request pays page faults for memory it had a
    moment ago (measured in serve_app/README.md). Setting the thresholds also stops glibc from moving them.
    """
    if platform.libc_ver()[0] != "glibc":
        logger.info("C library is not glibc (%s): malloc thresholds left as they are", platform.libc_ver()[0] or "?")
        return False
    libc = ctypes.CDLL("libc.so.6")
    for param, mb in ((M_TRIM_THRESHOLD, trim_mb), (M_MMAP_THRESHOLD, mmap_mb)):
        if libc.mallopt(param, mb << 20) != 1:
            raise OSError(f"mallopt({param}, {mb} MB) refused by glibc {platform.libc_ver()[1]}")
    return True


def setup_serving_process() -> None:
    """What every replica (and the in-process reference it is compared against) runs with."""
    one_compute_thread()
    keep_freed_memory()
