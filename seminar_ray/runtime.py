"""Connecting to Ray the same way from `python jobs/X.py` (embedded local Ray) and `ray job submit`."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from seminar_ray.errors import InputError

log = logging.getLogger(__name__)

PROJECT_LOGGERS = ("seminar_ray", "jobs", "serve_app", "__main__")
RAY_LOGGERS = ("ray", "ray.serve")  # Ray Core, Data and Train log under "ray"; Serve's has handlers of its own
RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {{format: "%(asctime)s %(levelname)s %(filename)s:%(lineno)s -- %(message)s"}}
handlers:
  file: {{class: logging.FileHandler, formatter: ray, filename: {file}}}
loggers:
  ray.data: {{level: INFO, handlers: [file], propagate: false}}
"""
_RAY_CONSOLE_LEVEL = "INFO"
LOCAL_LOGICAL_CPUS = 4  # on a 2-core laptop every actor asks for a fraction of these


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True):
    """Join the cluster at `address` or $RAY_ADDRESS (set by `ray job submit`), else start an embedded one."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train workers send print() through logging to stderr as well as to stdout; tqdm_ray's bar states are
    # prints, and the driver reads the two streams apart, so a bar's earlier state could arrive after its close and
    # be redrawn for the rest of the run. The workers of a local Ray inherit this.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        # address="local": never attach to some other cluster `ray start` left on this machine
        ray.init(
            address="local",
            num_cpus=num_cpus or max(LOCAL_LOGICAL_CPUS, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=not quiet,
            object_store_memory=1024**3,
        )
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return ray


def setup_logging(verbose: bool = False, log_dir: str | os.PathLike | None = None) -> None:
    """The project's INFO lines on stderr (every library's with `verbose`). Ray's own loggers go to `log_dir`/ray.log
    when given, unless `verbose`."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # this project's INFO lines; other libraries' only with --verbose
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    if log_dir is None or verbose:
        return
    global _RAY_CONSOLE_LEVEL
    _RAY_CONSOLE_LEVEL = "WARNING"
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # set before Ray starts, so that its worker processes inherit them: Serve's actors log to their files only,
    # Ray Data logs (driver and workers) to log_dir/ray-data.log
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    data_config = log_dir / "ray-data-logging.yaml"
    data_config.write_text(RAY_DATA_LOGGING.format(file=json.dumps(str(log_dir / "ray-data.log"))))
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(data_config))
    import ray  # noqa: F401  # configures the "ray" loggers, which are then pointed at the file
    import ray.serve  # noqa: F401  # configures "ray.serve" (a stream handler of its own) on import

    handler = logging.FileHandler(log_dir / "ray.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        logger.addHandler(handler)
        logger.propagate = False


def ray_console_level() -> str:
    """The level of Ray's own lines on the terminal: WARNING once setup_logging sent them to log files, else INFO."""
    return _RAY_CONSOLE_LEVEL


def ensure_logging() -> None:
    """In a Ray actor (a Ray Train worker), where nobody called setup_logging and Ray's own handlers may filter by
    Ray's level: this package's INFO lines go to stderr, which Ray forwards to the driver. A no-op elsewhere."""
    import ray

    logger = logging.getLogger("seminar_ray")
    if logger.handlers or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a job's main. Input the user can fix (InputError, a missing input file) becomes a one-line error and exit
    code 2; any other exception is a bug and keeps its traceback."""
    try:
        return main(argv)
    except (InputError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")  # the whole message for a user to act on, not a log record
        return 2
