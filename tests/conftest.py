"""Shared fixtures. One Ray cluster per test session: ray.init() costs ~10 s on this machine."""

from __future__ import annotations

import os

import pytest

from seminar_ray.testing.local_ray import init_local_ray

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by every test in this pytest process."""
    import ray

    if not ray.is_initialized():
        init_local_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset written once per session (the tables of docs/design.md, Data model)."""
    from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir

    out = tmp_path_factory.mktemp("data") / "tiny"
    cfg = SyntheticConfig.preset("tiny")
    generate_to_dir(cfg, out)
    return out


@pytest.fixture
def local_redis(tmp_path):
    """A private redis-server (127.0.0.1, free port, AOF fsynced on every write) for one test; stopped after it.

    No redis-server on PATH is an error saying how to install it (`make install`), never a skip."""
    from seminar_ray.testing.redis_local import LocalRedis

    with LocalRedis(tmp_path / "redis") as server:
        yield server
