"""cluster.yaml's node types on Ray's real autoscaler with the fake_multinode provider (seminar_ray/autoscaling.py),
in the multi-node pytest process. The cluster starts with a head and no worker; every worker node below is launched
by the autoscaler for a pending demand and terminated by it after the idle timeout. Each test records what the
autoscaler did (node types and times, `autoscaler` in the junit properties and on stdout) and asserts on it.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seminar_ray.autoscaling import LocalAutoscalingCluster, NodeWatcher, local_node_types

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SERVE_HEAD = {"CPU": 2, "object_store_memory": 200 * 1024**2}  # the Serve test's head: 2 logical CPUs
# The training test's head holds the job's Ray Data work: list, read and map tasks, and the evaluation set's
# repartition, whose 8 reduce tasks (like the listing task) ask 1 CPU each with no knob in Ray Data. With room on the
# head, the job's only demand is its Train worker's (docs/scaling.md, "What a job asks for").
TRAIN_HEAD = {"CPU": 8, "object_store_memory": 200 * 1024**2}
IDLE_MINUTES = 0.1  # 6 s: idle worker nodes go quickly (cluster.yaml: 10 min)
WAIT_S = 180  # bound on each wait for the autoscaler; the failure message says what it did meanwhile


@pytest.fixture(scope="module")
def types() -> dict:
    return local_node_types(ROOT / "cluster.yaml")


@contextlib.contextmanager
def _cluster(types: dict, head: dict):
    """A fresh cluster per test: no node, resource request or detached actor of one test outlives it."""
    import ray

    with LocalAutoscalingCluster(types, head_resources=head, idle_timeout_minutes=IDLE_MINUTES) as c:
        c.connect(log_to_driver=False, configure_logging=False)
        try:
            yield c
        finally:
            ray.shutdown()


@pytest.fixture
def cluster(types):
    with _cluster(types, SERVE_HEAD) as c:
        yield c


@pytest.fixture
def train_cluster(types):
    with _cluster(types, TRAIN_HEAD) as c:
        yield c


@pytest.fixture
def watch(types, record_property):  # request it after the cluster fixture: it polls the connected cluster
    with NodeWatcher(types) as w:
        yield w
    record_property("autoscaler", json.dumps(w.summary()))
    print("autoscaler:", w.summary())


def _pretrain(cluster, tiny_data, out: Path, *flags: str, timeout_s: float = 420) -> subprocess.CompletedProcess:
    """jobs/pretrain.py as `ray job submit` runs it: a driver joining the cluster through RAY_ADDRESS."""
    cmd = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--data", str(tiny_data), "--out", str(out),
           "--epochs", "1", "--num-workers", "1", "--cpus-per-worker", "0.5", "--samples-per-user", "1",
           "--eval-users", "16", "--set", "max_len=16", *flags]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


def test_cluster_starts_from_zero_workers_of_cluster_yaml_types(cluster, types, watch):
    assert set(types) == {"cpu_worker", "gpu_trainer"}
    assert types["gpu_trainer"]["resources"]["GPU"] == 1 and "gpu_trainer" in types["gpu_trainer"]["resources"]
    assert watch.launched() == [], "a worker node was running before any demand"


def test_infeasible_training_request_fails_fast_with_the_node_types(cluster, tiny_data, tmp_path, watch):
    """No node type has 4 CPUs with gpu_trainer, nor a `tpu` resource: the job exits 2 with a message naming the
    node types, before any work and without launching anything (no silent wait for a node that never comes)."""
    for flags in (["--cpus-per-worker", "4", "--worker-resources", '{"gpu_trainer": 0.01}'],
                  ["--worker-resources", '{"tpu": 1}']):
        proc = _pretrain(cluster, tiny_data, tmp_path, *flags, timeout_s=120)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "cannot be placed" in proc.stderr and "gpu_trainer (up to 2" in proc.stderr, proc.stderr[-2000:]
    assert watch.counts() == {}, f"the autoscaler launched nodes for an infeasible job: {watch.summary()}"


def test_pretrain_brings_up_a_gpu_trainer_node_and_gives_it_back(train_cluster, tiny_data, tmp_path, watch):
    """The Train worker asks for gpu_trainer: the job launches exactly one node, of that type, trains on it, and the
    node is terminated once idle. Nothing else is launched: the job's Ray Data work fits on the head."""
    proc = _pretrain(train_cluster, tiny_data, tmp_path, "--worker-resources", '{"gpu_trainer": 0.01}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert watch.counts() == {"gpu_trainer": 1}, f"the job launched {watch.summary()}"
    node = watch.launched("gpu_trainer")[0]
    summary = json.loads((tmp_path / "psu" / "metrics.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1]
    assert summary["history"][0]["worker_nodes"] == [node.node_id], "the worker did not run on the new node"
    watch.wait_for(lambda w: w.alive() == 0, WAIT_S, "the gpu_trainer node terminated once idle")
    assert watch.counts() == {"gpu_trainer": 1}, f"launched after the job: {watch.summary()}"
