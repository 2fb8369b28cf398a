"""Connecting to Ray the same way from `python jobs/X.py` (embedded local Ray) and `ray job submit`."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

LOCAL_LOGICAL_CPUS = 4  # on a 2-core laptop every actor asks for a fraction of these


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True):
    """Join the cluster at `address` or $RAY_ADDRESS (set by `ray job submit`), else start an embedded one."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        # address="local": never attach to some other cluster `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus or max(LOCAL_LOGICAL_CPUS, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=not quiet, object_store_memory=1024**3)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return ray


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a job's main; bad input (ValueError, FileNotFoundError) becomes a one-line error and exit code 2."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
