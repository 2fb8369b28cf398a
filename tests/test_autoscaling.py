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
import threading
import time
from pathlib import Path

import pytest
import yaml

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


def _serve_config() -> dict:
    """serve_app/config.cluster.yaml's app in its zero-work mode with a bench-only 50 ms spin per request, no HTTP
    proxies, replicas of 0.5 CPU without the cpu_worker steering: CPU alone decides where they fit. Three start on
    the head (1.5 of its 2 CPUs); PQRetriever scales 1..4 on load, so the 3rd and 4th cannot fit there."""
    cfg = yaml.safe_load((ROOT / "serve_app" / "config.cluster.yaml").read_text())
    cfg["proxy_location"] = "Disabled"
    cfg.pop("http_options")
    app = cfg["applications"][0]
    app["args"] = {"work": False, "topology": app["args"]["topology"], "retriever_extra_cpu_ms": 50}
    for dep in app["deployments"]:
        dep["ray_actor_options"] = {"num_cpus": 0.5}
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = 1
    retriever = next(d for d in app["deployments"] if d["name"] == "PQRetriever")
    retriever.pop("num_replicas")
    retriever["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
                                       "upscale_delay_s": 1, "downscale_delay_s": 5, "metrics_interval_s": 0.5,
                                       "look_back_period_s": 2}
    return cfg


def _replica_nodes(deployment: str) -> list[str]:
    from ray._private.state import actors

    return [a["Address"]["NodeID"] for a in actors().values()
            if a["State"] == "ALIVE" and (a.get("Name") or "").startswith(f"SERVE_REPLICA::seminar#{deployment}#")]


def _wait_running(timeout_s: float) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while (state := getattr(serve.status().applications.get("seminar"), "status", "NOT_STARTED")) != "RUNNING":
        assert state not in ("DEPLOY_FAILED", "UNHEALTHY") and time.time() < deadline, f"seminar: {state}"
        time.sleep(1)


def test_serve_load_past_the_head_brings_cpu_workers_and_gives_them_back(cluster, watch):
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(_serve_config())
    client = serve_api.serve_start(proxy_location=config.proxy_location)
    stop, served, errors = threading.Event(), [], []
    try:
        client.deploy_apps(config, _blocking=False)
        _wait_running(timeout_s=WAIT_S)
        assert watch.counts() == {}, f"the deployment at min_replicas did not fit the head: {watch.summary()}"
        handle = serve.get_app_handle("seminar")

        def load(user: int) -> None:
            while not stop.is_set():
                try:
                    reply = handle.score.remote({"user_id": user, "candidates": [1, 2, 3]}).result(timeout_s=60)
                    assert reply["scores"] == [0.0, 0.0, 0.0], reply
                    served.append(user)
                except Exception as exc:  # every failure is counted and reported by the assertion below
                    errors.append(repr(exc))

        threads = [threading.Thread(target=load, args=(u,), daemon=True) for u in range(8)]
        load_start = watch.now()
        for t in threads:
            t.start()
        workers = set()

        def scaled(w: NodeWatcher) -> bool:
            workers.update(e.node_id for e in w.launched("cpu_worker"))
            return bool(workers & set(_replica_nodes("PQRetriever")))

        watch.wait_for(scaled, WAIT_S, "a PQRetriever replica running on a launched cpu_worker node")
        served_during_scale_up = len(served)
        stop.set()
        for t in threads:
            t.join(timeout=90)
        assert not errors, f"{len(errors)} failed requests, first: {errors[:3]}"
        assert served_during_scale_up > 0
        assert set(watch.counts(after_s=load_start)) == {"cpu_worker"}, f"launched under load: {watch.summary()}"
        watch.wait_for(lambda w: w.alive("cpu_worker") == 0, WAIT_S, "cpu_worker nodes terminated after the load")
        assert _replica_nodes("PQRetriever") and serve.status().applications["seminar"].status == "RUNNING"
    finally:
        stop.set()
        serve.shutdown()
