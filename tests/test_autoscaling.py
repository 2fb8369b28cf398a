"""cluster.yaml's node types on Ray's real autoscaler with the fake_multinode provider
(seminar_ray/testing/fake_cluster.py), in the pytest process of the tests that start a Ray of their own (marker
ownray). The cluster starts with a head and no worker; every worker node below is launched by the autoscaler for a
pending demand and terminated by it after the idle timeout. Each test records what the autoscaler did (node types
and times, `autoscaler` in the junit properties and on stdout) and asserts on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from seminar_ray.testing.fake_cluster import LocalAutoscalingCluster, NodeWatcher, local_node_types

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.ownray, pytest.mark.timeout(600)]

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
    log.info("autoscaler: %s", w.summary())  # shown with a failing test


def _pretrain(cluster, tiny_data, out: Path, *flags: str, timeout_s: float = 420) -> subprocess.CompletedProcess:
    """jobs/pretrain.py as `ray job submit` runs it: a driver joining the cluster through RAY_ADDRESS."""
    cmd = [
        sys.executable,
        "-m",
        "jobs.pretrain",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--num-workers",
        "1",
        "--cpus-per-worker",
        "0.5",
        "--samples-per-user",
        "1",
        "--eval-users",
        "16",
        "--set",
        "max_len=16",
        *flags,
    ]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


def test_cluster_starts_from_zero_workers_of_cluster_yaml_types(cluster, types, watch):
    assert set(types) == {"cpu_worker", "gpu_trainer"}
    assert types["gpu_trainer"]["resources"]["GPU"] == 1 and "gpu_trainer" in types["gpu_trainer"]["resources"]
    assert watch.launched() == [], "a worker node was running before any demand"


def test_infeasible_training_request_fails_fast_with_the_node_types(cluster, tiny_data, tmp_path, watch):
    """No node type has 4 CPUs with gpu_trainer, nor a `tpu` resource: the job exits 2 with a message naming the
    node types, before any work and without launching anything (no silent wait for a node that never comes)."""
    for flags in (
        ["--cpus-per-worker", "4", "--worker-resources", '{"gpu_trainer": 0.01}'],
        ["--worker-resources", '{"tpu": 1}'],
    ):
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


# ------------------------------------------------------------------------------------------------------------ serving
# The production app (serve_app/app.py compose) on the Serve head of 2 CPUs. Each Retriever replica asks 1 CPU, as in
# serve_app/config.cluster.yaml, without the cpu_worker steering so that CPU alone decides where it goes: the first
# fits on the head beside the Scorer (0.25) and the HistoryWriter (0.1); the 2nd and 3rd (1.35 + 1 > 2) can only run
# on a node the autoscaler launches. Small delays so that Serve follows the load within seconds.
RETRIEVER_SCALING = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 5,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
}
SERVE_OPTIONS = {
    "Retriever": {"ray_actor_options": {"num_cpus": 1}, "autoscaling_config": RETRIEVER_SCALING},
    "Scorer": {"num_replicas": 1, "autoscaling_config": None},
}
CLIENTS = 16  # threads, each with one request in flight: ongoing requests far above the target of 1


def _retriever_nodes() -> set[str]:
    """The nodes the live Retriever replicas run on (GCS actor table)."""
    from ray._private.state import actors

    return {
        a["Address"]["NodeID"]
        for a in actors().values()
        if a["State"] == "ALIVE" and (a.get("Name") or "").startswith("SERVE_REPLICA::seminar#Retriever#")
    }


def _pending_demand() -> list:
    """What the autoscaler sees pending (its status in the GCS, as `ray status` reads it)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw)["load_metrics_report"]["resource_demand"] if raw else []


class Load:
    """Client threads calling the app's score route through one handle, each one request at a time, counting every
    success and failure; `pause_s` between calls makes a trickle.

    The handle is initialized here, once, before any thread uses it: Ray 2.60's DeploymentHandle initializes itself
    on its first `.options()`/`.remote()` without a lock, so threads that race there each build a router under the
    same handle id. The orphaned routers keep reporting zero ongoing requests for that id, the controller keeps
    whichever report is newest, and Serve's autoscaler saw 0 requests while 16 were in flight (it never scaled up,
    or scaled back down under load)."""

    def __init__(self, handle, users: int):
        self.handle, self.users = handle.options(method_name="score"), users
        self.served, self.errors = 0, list[str]()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, threads: int, stop: threading.Event, pause_s: float = 0.0) -> None:
        for i in range(threads):
            t = threading.Thread(target=self._run, args=(i % self.users, stop, pause_s), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, user: int, stop: threading.Event, pause_s: float) -> None:
        from seminar_ray.serving import ScoreRequest

        while not stop.wait(pause_s):
            try:
                reply = self.handle.remote(ScoreRequest(user_id=user, candidates=[1, 2, 3])).result(timeout_s=90)
                assert len(reply.scores) == 3, reply
                with self._lock:
                    self.served += 1
            except Exception as exc:  # every failure is counted and asserted on by the test
                with self._lock:
                    self.errors.append(repr(exc))

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self._threads), "a client thread is stuck"


def test_serve_load_past_the_head_brings_cpu_workers_and_gives_them_back(cluster, tmp_path, watch):
    """Load on the production app scales the Retriever past the head's CPUs: the autoscaler launches cpu_worker
    nodes, a Retriever replica runs on one, and once the load drops to a trickle Serve scales back to the head's
    replica and the nodes are terminated. Every request of both phases succeeds."""
    from ray import serve

    from seminar_ray.testing.artefacts import build_artefacts
    from serve_app.app import compose

    art = build_artefacts(tmp_path, num_users=8, min_len=10, max_len=30, model_max_len=32)
    args = {"checkpoint": str(art.checkpoint), "index": str(art.index), "data": str(art.data), "store": str(art.store)}
    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(compose(args, SERVE_OPTIONS), name="seminar", route_prefix=None)
        assert watch.counts() == {}, f"the app at min_replicas did not fit the head: {watch.summary()}"
        head_nodes = _retriever_nodes()
        load, heavy, trickle = Load(handle, users=8), threading.Event(), threading.Event()
        load_start = watch.now()
        load.start(CLIENTS, heavy)
        trace: list = []

        def scaled(w: NodeWatcher) -> bool:
            replicas = _retriever_nodes()
            if not trace or w.now() > trace[-1][0] + 2:
                trace.append((round(w.now(), 1), load.served, len(load.errors), len(replicas), _pending_demand()))
            return bool({e.node_id for e in w.launched("cpu_worker")} & replicas)

        try:
            watch.wait_for(scaled, WAIT_S, "a Retriever replica on a launched cpu_worker node")
        except TimeoutError as exc:  # (s, served, failed, Retriever replicas, the autoscaler's pending demand)
            raise AssertionError(f"{exc}; last samples: {trace[-3:]}; errors: {load.errors[:3]}") from exc
        finally:
            heavy.set()
            load.join()
        served_heavy = load.served
        load.start(1, trickle, pause_s=0.2)  # serving goes on while Serve scales down and the nodes go
        try:
            watch.wait_for(
                lambda w: bool(w.launched("cpu_worker")) and w.alive() == 0,
                WAIT_S,
                "every cpu_worker node terminated once the load stopped",
            )
        finally:
            trickle.set()
            load.join()
        assert not load.errors, f"{len(load.errors)} failed of {load.served + len(load.errors)}: {load.errors[:3]}"
        assert served_heavy > 0 and load.served > served_heavy, "no request served in one of the phases"
        assert set(watch.counts(after_s=load_start)) == {"cpu_worker"}, f"launched under load: {watch.summary()}"
        assert _retriever_nodes() == head_nodes, "the Retriever did not scale back to its replica on the head"
    finally:
        serve.shutdown()
