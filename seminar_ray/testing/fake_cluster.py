"""cluster.yaml's node types on Ray's fake multi-node autoscaler: the real autoscaler launching and terminating real
raylets on this machine (`fake_multinode` provider), for tests, the autoscaling bench and `cluster.local.yaml`.

    types = local_node_types("cluster.yaml")                 # worker types scaled down to one small machine
    with LocalAutoscalingCluster(types, head_cpus=2, idle_timeout_minutes=0.1) as cluster:
        ray.init(address=cluster.address)
        with NodeWatcher(types) as watch:                  # which node types came and went, and when
            ...
            watch.wait_for(lambda w: w.alive("gpu_trainer") == 1, timeout_s=120)

`LocalAutoscalingCluster` does what `ray.cluster_utils.AutoscalingCluster` does (same generated config, same
environment: RAY_FAKE_CLUSTER=1, AUTOSCALER_UPDATE_INTERVAL_S=1), with two differences that matter on a machine
other people run Ray on: it never runs `ray stop` (which stops every Ray on the machine) and stops only the processes
its own `ray start --head --block` started; and it does not need the `fake_multi_node/example.yaml` the Ray 2.60 wheel
leaves out (the config is complete here).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seminar_ray.autoscaling import NODE_TYPES_KEY, launchable

HEAD_TYPE = "ray.head.default"  # the fake provider names the head node type so

RESERVED = {"CPU", "GPU", "memory", "object_store_memory"}

FAKE_ENV = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}

logger = logging.getLogger(__name__)


class HeadExited(RuntimeError):
    """`ray start --head` exited while the cluster was starting or in use (its message carries the head's log)."""


def local_node_types(
    cluster_yaml: str | Path, cpus_per_node: float = 1, max_per_type: int = 2, object_store_bytes: int = 150 * 1024**2
) -> dict[str, dict]:
    """cluster.yaml's worker node types, scaled down to fit a laptop: every type keeps its name, its steering
    resources (gpu_trainer, cpu_worker) and its GPU count (a declared, fake GPU: nothing on the node uses CUDA); CPU
    becomes `cpus_per_node` logical CPUs (tasks ask for fractions), memory is left to the raylet, min_workers is 0 (the
    cluster starts with no worker) and max_workers is capped at `max_per_type`."""
    config = yaml.safe_load(Path(cluster_yaml).read_text())
    head = config["head_node_type"]
    out = {}
    for name, node_type in config["available_node_types"].items():
        if name == head:
            continue
        res = node_type["resources"]
        scaled = {
            "CPU": cpus_per_node,
            **({"GPU": res["GPU"]} if res.get("GPU") else {}),
            **{k: v for k, v in res.items() if k not in RESERVED},
            "object_store_memory": object_store_bytes,
        }
        out[name] = {
            "resources": scaled,
            "node_config": {},
            "min_workers": 0,
            "max_workers": min(int(node_type.get("max_workers", max_per_type)), max_per_type),
        }
    return out


def fake_cluster_config(
    worker_types: dict[str, dict],
    head_resources: dict,
    *,
    max_workers: int | None = None,
    idle_timeout_minutes: float = 0.1,
    upscaling_speed: float = 1.0,
    cluster_name: str = "seminar-ray-local",
) -> dict:
    """A complete autoscaling config for the fake_multinode provider (what `ray start --autoscaling-config` reads):
    the head type `ray.head.default` with `head_resources`, then `worker_types`."""
    types = copy.deepcopy(worker_types)
    types[HEAD_TYPE] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": cluster_name,
        "max_workers": max_workers if max_workers is not None else sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        # nodes share one IP (127.0.0.1); the autoscaler tells them apart by node id. No SSH updaters: every fake
        # node is a raylet the autoscaler starts itself.
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def free_gcs_port(low: int = 20000, high: int = 40000) -> int:
    """A port free on 127.0.0.1 that no other Ray's GCS on this machine uses: `ray start` refuses a port any
    gcs_server process on the machine was started with, even one in another network namespace."""
    import random
    import socket

    # private: no public Ray API lists the GCS addresses of the other Ray instances on this machine
    from ray._private.services import find_gcs_addresses

    taken = {int(a.rsplit(":", 1)[1]) for a in find_gcs_addresses() if ":" in a}
    find_gcs_addresses.cache_clear()  # type: ignore[attr-defined]  # an lru_cache
    for _ in range(100):
        port = random.randrange(low, high)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def head_start_command(
    config_path: str | Path, head_resources: dict, port: int = 6379, temp_dir: str | Path | None = None
) -> list[str]:
    """`ray start --head --block` for a fake_multinode config, on loopback only, without the dashboard. A private
    `temp_dir` keeps the machine's shared /tmp/ray (ray_current_cluster, session_latest) untouched."""
    res = dict(head_resources)
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--autoscaling-config={config_path}",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=false",
        f"--num-cpus={res.pop('CPU', 0)}",
        f"--num-gpus={res.pop('GPU', 0)}",
    ]
    if "object_store_memory" in res:
        cmd.append(f"--object-store-memory={int(res.pop('object_store_memory'))}")
    if res:
        cmd.append(f"--resources={json.dumps(res)}")
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    return cmd


def head_registered(gcs: Any) -> bool:  # a ray._raylet.GcsClient, a Cython class mypy cannot see
    """Whether the head's GCS answers and its raylet has registered with it, the point after which `ray start --head`
    no longer exits on its own (it gives the raylet a fixed 30 s to register: a GCS that answers is not yet a head
    that stays up)."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo  # type: ignore[attr-defined]  # protobuf-generated

    alive = gcs.get_all_node_info(timeout=2, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
    return bool(alive) and bool(gcs.internal_kv_get(b"session_name", b"session", timeout=2))


class LocalAutoscalingCluster:
    """A head raylet with the autoscaler on the fake_multinode provider; worker nodes come and go with demand.

    Started with `ray start --head --block` as a child process in its own session; `shutdown()` signals that process
    (Ray's SIGTERM handler stops the head's GCS, raylet and autoscaler, whose fake nodes share its fate) and then
    kills any of its descendants still running, by pid. Run it where port `port` is free on 127.0.0.1 (the tests and
    the bench run inside a private network namespace, scripts/test.sh)."""

    def __init__(
        self,
        worker_types: dict[str, dict],
        head_resources: dict | None = None,
        port: int | None = None,
        **config_kwargs,
    ):
        self.head_resources = dict(head_resources or {"CPU": 1})
        self.port = port or free_gcs_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = fake_cluster_config(worker_types, self.head_resources, **config_kwargs)
        self.config["provider"]["gcs_address"] = self.address  # where fake nodes join (the provider assumes 6379)
        self._proc: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="sr_fake_")  # short: Ray's socket paths live under it
        self.log_path = Path(self._dir) / "ray_start.log"
        # Ray 2.60 turns token authentication on when ~/.ray/auth_token exists: this cluster gets a token of its own,
        # which its head, its nodes and (through os.environ, while it runs) this process and its children use
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self._saved_env: dict[str, str | None] = {}
        self.head_env: dict[str, str] = {}  # extra environment for the head's processes only

    def start(self, timeout_s: float = 120, attempts: int = 2) -> LocalAutoscalingCluster:
        """Start the head and wait until its raylet has registered (`head_registered`). A head that exits during
        start-up is started again, up to `attempts` times: Ray gives the head's raylet a fixed 30 s to register with
        the GCS, which a loaded machine can miss (seen at load average 8, the head exiting with "timed out during
        startup")."""
        for attempt in range(1, attempts):
            try:
                return self._start_once(timeout_s)
            except HeadExited:
                logger.warning("the Ray head exited during start-up; starting it again (attempt %d)", attempt + 1)
                time.sleep(5)
        return self._start_once(timeout_s)

    def _start_once(self, timeout_s: float) -> LocalAutoscalingCluster:
        Path(self._dir).mkdir(parents=True, exist_ok=True)  # shutdown() removes it
        config_path = Path(self._dir) / "autoscaling.yaml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._use_auth_env()
        env = {**os.environ, **FAKE_ENV, **self.head_env}
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                head_start_command(config_path, self.head_resources, self.port, Path(self._dir) / "ray"),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_for_head(timeout_s)
            self._publish()
        except BaseException:
            self.shutdown()
            raise
        return self

    def connect(self, attempts: int = 3, **init_kwargs) -> None:
        """ray.init() to this cluster. A driver's first lookup asks the GCS about every raylet on the machine (other
        clusters' too); on a loaded machine that call can time out, so it is retried a bounded number of times."""
        import ray

        for attempt in range(attempts):
            self._check_head()
            try:
                ray.init(address=self.address, **init_kwargs)
                return
            except (ConnectionError, RuntimeError):
                ray.shutdown()
                self._check_head()
                if attempt == attempts - 1:
                    raise
                time.sleep(5)

    def _check_head(self) -> None:
        """Fail at once when the head is gone: `ray start --head --block` exits, taking its GCS with it, when the head
        times out during start-up (seen at load average 150), and a driver would wait on the dead GCS for minutes."""
        if self._proc is not None and self._proc.poll() is not None:
            raise HeadExited(f"ray start --head exited with {self._proc.returncode}: {self.log_tail()}")

    def _wait_for_head(self, timeout_s: float) -> None:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # a Cython class mypy cannot see

        deadline = time.time() + timeout_s
        while True:
            time.sleep(1)  # first: a head that fails at once has exited by now, before a GCS client waits on it
            self._check_head()
            try:
                if head_registered(GcsClient(address=self.address)):
                    return
            except Exception as exc:  # the GCS is not listening yet: retried until the deadline
                self._check_head()
                if time.time() > deadline:
                    raise RuntimeError(
                        f"the head's GCS at {self.address} did not come up in {timeout_s:.0f} s: "
                        f"{exc}; {self.log_tail()}"
                    ) from exc

    def _publish(self) -> None:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # a Cython class mypy cannot see

        GcsClient(address=self.address).internal_kv_put(
            NODE_TYPES_KEY, json.dumps(launchable(self.config)).encode(), True, None
        )

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def shutdown(self, timeout_s: float = 30) -> None:
        if self._proc is None:
            return
        import psutil
        import ray  # noqa: F401  (ray puts its bundled psutil on sys.path)

        try:
            tree = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        kill_processes(tree, grace_s=10)
        self._proc = None
        self._restore_env()
        shutil.rmtree(self._dir, ignore_errors=True)  # the config, the head's log and the session's logs

    def _use_auth_env(self) -> None:
        self._saved_env = {k: os.environ.get(k) for k in self.auth_env}
        os.environ.update(self.auth_env)
        _reload_auth_config()

    def _restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}
        _reload_auth_config()

    def __enter__(self) -> LocalAutoscalingCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def kill_processes(procs: list, grace_s: float = 0.0) -> None:
    """Kill the psutil processes `procs` still running after `grace_s` seconds and wait for them. psutil checks that
    each pid still names the same process (its start time), so a reused pid is never killed."""
    import psutil
    import ray  # noqa: F401  (ray puts its bundled psutil on sys.path)

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)


def _reload_auth_config() -> None:
    """Make this process see RAY_AUTH_MODE / RAY_AUTH_TOKEN as they are now (Ray caches both)."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # Cython

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class NodeEvent:
    node_id: str
    node_type: str
    up_s: float  # seconds after the watcher started that the node was first seen alive
    down_s: float | None = None  # ... and first seen dead (terminated)


def node_type_of(resources: dict, worker_types: dict[str, dict]) -> str:
    """The worker type whose custom resources a node carries (the head carries none of them)."""
    for name, node_type in worker_types.items():
        custom = {k for k in node_type["resources"] if k not in RESERVED}
        if custom and custom <= set(resources):
            return name
    return HEAD_TYPE


@dataclass
class NodeWatcher:
    """Polls the cluster's node table (ray.nodes(), in a connected driver) and records every node that joins or
    leaves with its type and times. Use as a context manager around the workload."""

    worker_types: dict[str, dict]
    interval_s: float = 0.5
    events: dict[str, NodeEvent] = field(default_factory=dict)
    t0: float = field(default_factory=time.time)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> NodeWatcher:
        self.poll()
        self._thread = threading.Thread(target=self._run, daemon=True, name="node-watcher")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def now(self) -> float:
        return time.time() - self.t0

    def poll(self) -> None:
        import ray

        nodes = ray.nodes()
        t = self.now()
        with self._lock:
            for n in nodes:
                node_id = n["NodeID"]
                if n["Alive"] and node_id not in self.events:
                    self.events[node_id] = NodeEvent(node_id, node_type_of(n["Resources"], self.worker_types), t)
                elif not n["Alive"] and node_id in self.events and self.events[node_id].down_s is None:
                    self.events[node_id].down_s = t

    def launched(self, node_type: str | None = None, after_s: float = 0.0) -> list[NodeEvent]:
        with self._lock:
            return [
                e
                for e in self.events.values()
                if e.node_type != HEAD_TYPE and e.up_s >= after_s and (node_type is None or e.node_type == node_type)
            ]

    def alive(self, node_type: str | None = None) -> int:
        return sum(1 for e in self.launched(node_type) if e.down_s is None)

    def counts(self, after_s: float = 0.0) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.launched(after_s=after_s):
            out[e.node_type] = out.get(e.node_type, 0) + 1
        return out

    def wait_for(self, predicate: Callable[[NodeWatcher], bool], timeout_s: float, what: str = "") -> float:
        """Block until predicate(self) holds; return the watcher time it first held. Raises TimeoutError with
        what happened so far."""
        deadline = time.time() + timeout_s
        while not predicate(self):
            if time.time() > deadline:
                raise TimeoutError(f"{what or 'condition'} not reached in {timeout_s:.0f} s; nodes: {self.summary()}")
            time.sleep(self.interval_s / 2)
        return self.now()

    def summary(self) -> list[dict]:
        with self._lock:
            return [
                {
                    "type": e.node_type,
                    "up_s": round(e.up_s, 1),
                    "down_s": None if e.down_s is None else round(e.down_s, 1),
                }
                for e in self.events.values()
            ]
