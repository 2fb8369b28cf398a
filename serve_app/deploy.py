"""Start the application from Python (dev runs, the demo, the bench): local Ray if needed, HTTP on loopback."""
import ray
from ray import serve

from serve_app.app import build_app

APP_NAME = "seminar"


def start(args: dict, host: str = "127.0.0.1", port: int = 8000, num_cpus: float = 4,
          name: str = APP_NAME) -> serve.handle.DeploymentHandle:
    """Deploy or update the app (serve.run gives a new code version, so Serve rolls every replica with no failed
    request; `serve deploy` of a config changing only user_config reconfigures in place)."""
    if not ray.is_initialized():
        ray.init(address="auto" if _cluster_running() else "local", num_cpus=None if _cluster_running() else num_cpus,
                 include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port}, logging_config={"enable_access_log": False})
    return serve.run(build_app(args), name=name, route_prefix="/")


def _cluster_running() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
