"""The local Ray node the tests and benchmarks share the settings of: 4 logical CPUs on 2 cores (every actor and
task asks for a fraction), a 512 MiB object store, no dashboard, Ray's logging left alone."""

from __future__ import annotations

RAY_CPUS = 4
OBJECT_STORE_BYTES = 512 * 1024**2


def init_local_ray() -> None:
    """Start a fresh local Ray node in this process (`address="local"`: never another cluster on the machine)."""
    import ray

    ray.init(
        address="local",
        num_cpus=RAY_CPUS,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
