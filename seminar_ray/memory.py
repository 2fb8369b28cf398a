"""glibc malloc settings for processes that allocate and free the same large arrays again and again: serving
replicas (a request's arrays, a few MB) and training workers (a step's activations, up to hundreds of MB)."""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt(3) parameters


def keep_freed_memory(trim_mb: int = 64, mmap_mb: int | None = 32) -> bool:
    """glibc: keep up to `trim_mb` of freed memory at the top of each malloc arena, and serve allocations below
    `mmap_mb` from the arenas rather than from fresh mappings; `mmap_mb` None: never map, every allocation comes from
    the arenas. False (and nothing changed) on other C libraries.

    With glibc's defaults an array above the mmap threshold (at most 32 MB, glibc's ceiling) is a fresh mapping each
    time it is allocated, and memory freed at the top of an arena goes back to the kernel: either way the next
    allocation pays a page fault per 4 KiB for memory the process had a moment ago. A serving request allocates a few
    MB of arrays (GSU scores [C, L] fp32, their argpartition [C, L] int64); a training step at L = 2,000 allocates
    [T·C, K, d] gathered rows and [T·C, H, N] attention weights of 20-200 MB each, which no threshold covers, hence
    None for training (measured in docs/scaling.md). Setting the thresholds also stops glibc from moving them.
    """
    if platform.libc_ver()[0] != "glibc":
        logger.info("C library is not glibc (%s): malloc thresholds left as they are", platform.libc_ver()[0] or "?")
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = [(M_TRIM_THRESHOLD, trim_mb << 20)]
    settings.append((M_MMAP_MAX, 0) if mmap_mb is None else (M_MMAP_THRESHOLD, mmap_mb << 20))
    for param, value in settings:
        if libc.mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) refused by glibc {platform.libc_ver()[1]}")
    return True
