"""cluster.yaml passes Ray's own launcher validation, and what jobs and replicas ask for exists on some node type.

Offline: prepare_config only merges the provider's defaults.yaml (no boto3, no credentials, no API calls); the
cloud-side bootstrap (key pairs, IAM roles, subnets) happens in `ray up` and is not run here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # the launcher's JSON schema plus its cross-field checks
    return config


def _workers(config: dict) -> dict[str, dict]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_cluster_yaml_validates_with_a_head_and_cpu_and_gpu_worker_types(prepared):
    assert prepared["provider"]["type"] in ("aws", "gcp")
    assert prepared["idle_timeout_minutes"] > 0
    workers = _workers(prepared)
    assert len(workers) >= 2
    cpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) == 0}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert cpu and gpu, "needs CPU workers (data, serving) and GPU workers (training)"
    for name, node_type in prepared["available_node_types"].items():
        assert {"CPU", "memory"} <= set(node_type["resources"]), f"{name}: explicit CPU and memory resources"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= prepared["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= prepared["max_workers"]


def test_setup_commands_install_this_project_from_the_synced_tree(prepared):
    mounts = prepared["file_mounts"]
    target = next(remote for remote, local in mounts.items() if (ROOT / local).resolve() == ROOT)
    install = [c for c in prepared["setup_commands"] if "pip install" in c and "-e ." in c]
    assert install and f"cd {target}" in install[0] and "-c constraints.txt" in install[0]
    assert (ROOT / "constraints.txt").exists() and (ROOT / "pyproject.toml").exists()
    assert {".venv", "runs"} <= set(prepared["rsync_exclude"]), "the local venv and run outputs are not synced"
    pinned = re.search(r"^ray(?:\[.*\])?==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    images = [prepared["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in prepared["available_node_types"].values() if "docker" in t
    ]
    assert all(f":{pinned}-" in image for image in images), f"images {images} do not run ray {pinned}"


def test_steering_resources_exist_on_the_intended_node_type(prepared):
    """Training workers ask for gpu_trainer, Serve replicas for cpu_worker (docs/scaling.md); each is provided by
    a worker type of the right kind and never by the head, which keeps CPU 0 for tasks."""
    workers = _workers(prepared)
    head = prepared["available_node_types"][prepared["head_node_type"]]["resources"]
    assert head["CPU"] == 0 and "gpu_trainer" not in head and "cpu_worker" not in head
    trainers = [t for t in workers.values() if t["resources"].get("gpu_trainer")]
    servers = [t for t in workers.values() if t["resources"].get("cpu_worker")]
    assert trainers and all(t["resources"]["GPU"] >= 1 for t in trainers)
    assert servers and all(t["resources"].get("GPU", 0) == 0 for t in servers)
    serve = yaml.safe_load((ROOT / "serve_app" / "config.cluster.yaml").read_text())
    for dep in serve["applications"][0]["deployments"]:
        asked = dep["ray_actor_options"]["resources"]
        assert set(asked) == {"cpu_worker"} and all(0 < v <= 1 for v in asked.values()), dep["name"]
        assert dep["ray_actor_options"]["num_cpus"] <= min(t["resources"]["CPU"] for t in servers)


def test_serve_cluster_config_passes_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_app" / "config.cluster.yaml").read_text()))
    assert config.http_options.host == "0.0.0.0" and config.proxy_location.value == "EveryNode"
    app = config.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    assert {d.name for d in app.deployments} == {"Retriever", "Scorer", "HistoryWriter"}


def test_worker_resources_flag_reaches_the_scaling_config(tmp_path):
    from jobs.common import add_train_flags, job_from_args
    from seminar_ray.train.job import worker_resources

    p = argparse.ArgumentParser()
    add_train_flags(p)
    args = p.parse_args(
        [
            "--data",
            "s3://bucket/data",
            "--out",
            "s3://bucket/runs",
            "--num-workers",
            "4",
            "--cpus-per-worker",
            "6",
            "--use-gpu",
            "--worker-resources",
            '{"gpu_trainer": 0.01}',
        ]
    )
    job = job_from_args(args, "psu")
    assert job.data == "s3://bucket/data" and job.run_dir == "s3://bucket/runs/psu"
    assert worker_resources(job) == {"CPU": 6.0, "GPU": 1, "gpu_trainer": 0.01}
    job.worker_resources = {"GPU": 2}
    with pytest.raises(ValueError, match="--worker-resources: GPU=2"):
        worker_resources(job)


def test_local_cluster_yaml_has_cluster_yaml_node_types_on_the_fake_provider():
    """cluster.local.yaml (docs/scaling.md, "On a laptop") is cluster.yaml's worker types as
    seminar_ray.testing.fake_cluster
    scales them for the tests and the bench, on the fake_multinode provider, and passes the launcher's schema."""
    from ray.autoscaler._private.util import validate_config

    from seminar_ray.autoscaling import launchable
    from seminar_ray.testing.fake_cluster import HEAD_TYPE, local_node_types

    local = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    validate_config(local)
    assert local["provider"]["type"] == "fake_multinode" and local["head_node_type"] == HEAD_TYPE
    workers = {k: v for k, v in local["available_node_types"].items() if k != HEAD_TYPE}
    assert workers == local_node_types(ROOT / "cluster.yaml")
    assert {t["name"]: t["max_count"] for t in launchable(local)} == {"cpu_worker": 2, "gpu_trainer": 2}


def test_cluster_yaml_head_publishes_its_node_types_for_the_placement_check(prepared):
    """Ray's v1 autoscaler publishes no node-type table; the head's start commands publish cluster.yaml's, which
    jobs' placement check reads (so GPU workers are accepted while no gpu_trainer node runs yet)."""
    from seminar_ray.autoscaling import launchable

    assert any(
        "seminar_ray.autoscaling publish ~/ray_bootstrap_config.yaml" in c for c in prepared["head_start_ray_commands"]
    )
    assert {t["name"]: t["max_count"] for t in launchable(prepared)} == {"cpu_worker": 6, "gpu_trainer": 4}


def test_a_head_that_exits_in_start_up_is_started_again_then_reported_with_its_log(monkeypatch):
    """`ray start --head` exits when its raylet misses Ray's fixed 30 s to register (a loaded machine): the local
    cluster starts it again, a bounded number of times, then raises with the head's log, leaving nothing behind."""
    import os

    from seminar_ray.testing import fake_cluster

    starts: list[Path] = []

    def exiting_head(config_path, *args):
        starts.append(config_path)
        assert config_path.exists(), "each start writes its config anew (a failed start removes the directory)"
        return ["sh", "-c", "echo raylet timed out during startup; exit 3"]

    monkeypatch.setattr(fake_cluster, "head_start_command", exiting_head)
    token = os.environ.get("RAY_AUTH_TOKEN")
    cluster = fake_cluster.LocalAutoscalingCluster({})
    with pytest.raises(fake_cluster.HeadExited, match="exited with 3: raylet timed out during startup"):
        cluster.start(timeout_s=30, attempts=2)
    assert len(starts) == 2
    assert not starts[0].parent.exists() and os.environ.get("RAY_AUTH_TOKEN") == token
