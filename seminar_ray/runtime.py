"""Connecting to Ray the same way from `python jobs/X.py` (embedded local Ray) and `ray job submit`."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import warnings
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
_WORKER_LOG: Path | None = None  # where Ray's lines forwarded from its workers go, once setup_logging names a log dir
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"  # the project's lines, in the driver and in Ray's workers alike
LOG_DATEFMT = "%H:%M:%S"
PROJECT_LINE = re.compile(r"^\d\d:\d\d:\d\d (seminar_ray|jobs|serve_app)[\w.]*: ")  # a LOG_FORMAT line of ours
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
    if _WORKER_LOG is not None and not quiet:
        route_worker_output(_WORKER_LOG, bars=sys.stderr.isatty())
    return ray


def route_worker_output(log_file: Path, bars: bool) -> None:
    """Of what Ray forwards to this driver from its worker processes and daemons, print the project's own lines
    (LOG_FORMAT, see ensure_logging) and, on a terminal, tqdm_ray's bars; append Ray's own lines (its actors'
    warnings, its C++ errors, which always go to a process's stderr, the errors the GCS pushes to drivers) to
    `log_file`. Ray 2.60 prints both streams with `ray._private.worker.print_to_stdstream` (no public hook exists):
    the forwarded output through the handler `ray.init(log_to_driver=True)` registers, which is replaced under its
    name so that ray.shutdown removes it, and the pushed errors through the module function itself."""
    from ray._private import worker
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    show = worker.print_to_stdstream

    def route(data: dict, ignore_prefix: bool = False) -> None:
        shown: list[str] = []
        logged: list[str] = []
        for line in data.get("lines", []):
            ours = PROJECT_LINE.match(line) or (bars and RAY_TQDM_MAGIC in line)
            (shown if ours else logged).append(line)
        if logged:
            source = f"({data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')})"
            with open(log_file, "a") as f:
                f.writelines(f"{source} {line}\n" for line in logged)
        if shown:
            show({**data, "lines": shown}, ignore_prefix=ignore_prefix)

    ignore = worker._should_ignore_worker_log_prefix(worker.global_worker)
    worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    worker.global_worker_stdstream_dispatcher.add_handler(
        "ray_print_logs", functools.partial(route, ignore_prefix=ignore)
    )
    worker.print_to_stdstream = route


def _ray_warnings_to_log(show: Callable) -> Callable:
    """A warnings.showwarning that logs warnings raised in Ray's own modules to the "ray" logger (its log file) and
    shows every other warning as before."""
    import ray

    ray_dir = os.path.dirname(ray.__file__)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(ray_dir):
            logging.getLogger("ray").warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def setup_logging(verbose: bool = False, log_dir: str | os.PathLike | None = None) -> None:
    """The project's INFO lines on stderr (every library's with `verbose`). Unless `verbose`, a `log_dir` receives
    Ray's own lines (_ray_lines_to) and what native code writes to stderr (_native_stderr_to)."""
    if log_dir is not None and not verbose:  # first: the handlers below write to the terminal's stderr
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        _native_stderr_to(Path(log_dir) / "native-stderr.log")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    if not verbose:  # this project's INFO lines; other libraries' only with --verbose
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    if log_dir is not None and not verbose:
        _ray_lines_to(Path(log_dir))


def _ray_lines_to(log_dir: Path) -> None:
    """Ray's own lines go to files in `log_dir`: its Python loggers (ray.log, ray-data.log), its warnings, and what
    its workers send to the driver (ray-workers.log, see route_worker_output)."""
    global _RAY_CONSOLE_LEVEL, _WORKER_LOG
    _RAY_CONSOLE_LEVEL = "WARNING"
    _WORKER_LOG = log_dir / "ray-workers.log"
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
    warnings.showwarning = _ray_warnings_to_log(warnings.showwarning)


def _native_stderr_to(path: Path) -> None:
    """Send what native code writes to this process's stderr (Ray's C++ core worker logs every error there as well
    as in its log file; so do the raylet and GCS this driver starts) to `path`, while Python's sys.stderr (logging,
    warnings, tracebacks, progress bars) keeps the terminal."""
    sys.stderr.flush()
    terminal = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")


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
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
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
