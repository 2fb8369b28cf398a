"""Start the application from Python (dev runs, the demo, the bench): local Ray if needed, HTTP on loopback.

Two ingress modes, chosen when Ray starts (Serve reads them from the environment of every Serve process):
- "proxy" (Serve's default): clients talk to the HTTP proxy, which forwards each request to an ingress replica.
- "direct": Ray Serve's throughput-optimized preset (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, Ray ≥ 2.55): every ingress
  replica serves HTTP itself on its own port (direct ingress; the head-node proxy stays up as a fallback), replicas
  talk gRPC, and user code and routers run on each replica's main event loop. Clients spread requests over
  `direct_urls()` (what HAProxy does in Serve's `RAY_SERVE_ENABLE_HA_PROXY` mode on a cluster). The measured
  comparison is in serve_app/README.md.
"""

import os
import time

import ray
from ray import serve

from serve_app.app import AppArgs, compose

APP_NAME = "seminar"
# Serve's end-to-end HTTP timeout: a request held by a replica that died answers 408 after this, not after the
# client's own timeout (60 s in the tests). Scoring takes milliseconds; 15 s covers queueing during a roll.
REQUEST_TIMEOUT_S = 15.0
INGRESS_MODES = ("proxy", "direct")
DIRECT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def _check_ingress(ingress: str) -> None:
    if ingress not in INGRESS_MODES:
        raise ValueError(f"ingress must be one of {INGRESS_MODES}, got {ingress!r}")


def set_ingress_env(ingress: str) -> None:
    """Put the mode's variables in this process's environment: a local Ray started afterwards inherits them."""
    _check_ingress(ingress)
    for key in DIRECT_ENV:
        os.environ.pop(key, None)
    if ingress == "direct":
        os.environ.update(DIRECT_ENV)


def start(
    args: AppArgs | dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int = 4,
    name: str = APP_NAME,
    ingress: str = "proxy",
    options: dict[str, dict] | None = None,
) -> serve.handle.DeploymentHandle:
    """Deploy or update the app (serve.run gives a new code version, so Serve rolls every replica with no failed
    request; `serve deploy` of a config changing only user_config reconfigures in place)."""
    _check_ingress(ingress)
    if not ray.is_initialized() and not _cluster_running():
        set_ingress_env(ingress)
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
    elif ingress == "direct" and os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1":
        # a running Ray's processes keep the environment they started with
        raise ValueError(
            "ingress='direct' needs a Ray started in that mode: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
            "ray start ... (and the same variable here)"
        )
    elif not ray.is_initialized():
        ray.init(address="auto", include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S},
        logging_config={"enable_access_log": False},
    )
    return serve.run(compose(args, options), name=name, route_prefix="/")


def direct_urls(app: str = APP_NAME, wait_s: float = 10.0) -> list[str]:
    """The HTTP addresses of the app's running ingress replicas in direct mode ([] in proxy mode, after wait_s).

    Serve 2.60 has no public call for this; the controller's `get_target_groups` is what its HAProxy manager uses.
    A replica's port is published a moment after it starts running, hence the short wait.
    """
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    # A target is listed with its node's address; replicas listen on http_options.host, which is the address to use
    # when it is loopback (the default here: nothing else can reach them).
    bound: str = ray.get(controller.get_http_config.remote()).host  # type: ignore[attr-defined]  # an actor call
    loopback = bound if bound == "localhost" or bound.startswith("127.") else None
    deadline = time.monotonic() + wait_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(app))
        urls = sorted(
            f"http://{loopback or t.ip}:{t.port}"
            for g in groups
            if g.protocol == "HTTP" and g.app_name == app
            for t in g.targets
        )
        if urls or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)


def _cluster_running() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))
