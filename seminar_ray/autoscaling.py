"""The worker node types a cluster's autoscaler may launch, published in the GCS for the jobs' placement check.

`python -m seminar_ray.autoscaling publish CONFIG.yaml` runs on the head after `ray start --head` (cluster.yaml's
head start commands); `published_node_types` is what `seminar_ray.train.job` reads. The fake multi-node cluster the
tests and the autoscaling bench start is in `seminar_ray.testing.fake_cluster`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

NODE_TYPES_KEY = b"seminar_ray/node_types"  # GCS internal KV: the worker node types an autoscaler may launch


def launchable(config: dict) -> list[dict]:
    """The worker node types of an autoscaling config: name, resources, and how many the autoscaler may launch."""
    cap = int(config.get("max_workers", 1 << 20))
    head = config["head_node_type"]
    return [
        {
            "name": name,
            "resources": {k: v for k, v in t.get("resources", {}).items() if k != "memory"},
            "max_count": min(int(t.get("max_workers", cap)), cap),
        }
        for name, t in config["available_node_types"].items()
        if name != head
    ]


def publish_node_types(config: dict) -> None:
    """Record in the cluster's GCS which node types its autoscaler may launch, so a job's placement check counts
    nodes that do not exist yet. Ray's v1 autoscaler (`ray up`, the fake provider) publishes no such table; Ray's
    own (`state.get_cluster_config()`, KubeRay / autoscaler v2) is read first where it exists. Needs ray.init()."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(NODE_TYPES_KEY, json.dumps(launchable(config)).encode(), overwrite=True)


def published_node_types() -> list[dict] | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(NODE_TYPES_KEY)
    return json.loads(raw) if raw else None


def main(argv: list[str] | None = None) -> int:
    """python -m seminar_ray.autoscaling publish CONFIG.yaml: run on the head after `ray start --head`."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("command", choices=["publish"])
    p.add_argument("config", type=Path, help="the autoscaling config the head runs (~/ray_bootstrap_config.yaml)")
    args = p.parse_args(argv)
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    config = yaml.safe_load(args.config.expanduser().read_text())
    publish_node_types(config)
    for t in launchable(config):
        print(f"{t['name']}: up to {t['max_count']} × {t['resources']}")  # noqa: T201 (the command's output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
