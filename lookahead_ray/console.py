"""What a person running ``lookahead-ray`` sees: stage lines, one progress bar per long stage and a closing
summary on the console; everything else in ``OUTPUT_DIR/logs/lookahead.log``.

Ray's worker output (DeepSpeed and transformers in the training workers, Ray Train's controller), Ray Data's
per-dataset plans and library warnings are written to the log file, not the console. ``-v`` restores the full
stream. Warnings of this package reach the console once each: they are the user's (a truncated row count, a
fallback taken, an unreachable judge).

The CLI turns this on with :func:`configure`; library calls from tests or Tune trials leave logging as it is,
because :func:`use_output_dir` and the Ray hooks do nothing until the CLI asked for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_FILE = os.path.join("logs", "lookahead.log")
TRACEBACK_TAIL_LINES = 15
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that keep their own console handlers (propagate=False or a handler of their own): quietened one by one.
_LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "transformers", "DeepSpeed", "torch")


class _Console:
    active = False
    verbose = False
    started = time.perf_counter()
    log_path: Path | None = None
    log_remote: str | None = None
    """The run's log location when the output directory is a URI: the local log is uploaded there at close."""
    file_handler: logging.Handler | None = None
    console_handler: logging.Handler | None = None
    ray_printer: Any = None
    """Ray's own worker-output handler while ours replaces it (put back by :func:`close`)."""


state = _Console()
log = logging.getLogger("lookahead_ray.console")
"""Records for the log file only (stage lines, summaries, tracebacks): the console shows them its own way."""
log.propagate = False


class _OncePerMessage(logging.Filter):
    """Each distinct warning reaches the console once; the log file keeps every occurrence."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _LogFile(logging.FileHandler):
    """The run's log file. When it cannot be written (a full disk), the console says so once and the file is
    given up, instead of logging's "--- Logging error ---" traceback for every record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        print(f"lookahead-ray: the log {self.baseFilename} could not be written ({error}); it is not kept "
              "from here on", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)


def configure(verbose: bool) -> None:
    """Console logging for a CLI run: everything at INFO with ``verbose``, else this package's warnings only."""
    state.active, state.verbose, state.started = True, verbose, time.perf_counter()
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT if verbose else "%(levelname)s: %(message)s"))
    if not verbose:
        console.setLevel(logging.WARNING)
        console.addFilter(logging.Filter("lookahead_ray"))
        console.addFilter(_OncePerMessage())
        logging.captureWarnings(True)  # Python warnings go to the "py.warnings" logger: the log file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root.addHandler(console)
    state.console_handler = console


def close() -> None:
    """Undo :func:`configure` (the CLI's ``main`` returns; tests call it many times in one process)."""
    for name in ("", *_LIBRARY_LOGGERS, "ray.workers", log.name):
        for handler in (state.file_handler, state.console_handler):
            logging.getLogger(name).removeHandler(handler)
    if state.file_handler is not None:
        with contextlib.suppress(OSError):  # a full disk: the console said so already
            state.file_handler.close()
    if state.log_remote is not None and state.log_path is not None:
        from lookahead_ray import storage

        try:
            storage.upload_file(str(state.log_path), state.log_remote)
        except Exception as exc:  # noqa: BLE001 - the local copy stays and is named
            print(f"lookahead-ray: could not upload the log to {state.log_remote} ({exc}); it is in "
                  f"{state.log_path}", file=sys.stderr)
    if state.ray_printer is not None:
        import ray
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        # This command connected Ray (its printer was ours to swap) and is done with it. Workers' last lines (Ray
        # Train's controller reporting the failure just printed as one line) arrive a moment later: disconnect
        # first, or Ray's printer, put back, shows them on the console.
        with contextlib.suppress(Exception):
            ray.shutdown()
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", state.ray_printer)
    state.active, state.log_path, state.file_handler, state.console_handler, state.ray_printer = (
        False, None, None, None, None)
    state.log_remote = None


def use_output_dir(directory: str | os.PathLike) -> Path | None:
    """Send the run's log to ``directory/logs/lookahead.log`` (appended: reruns keep earlier runs' lines). For a
    URI the log is written to a local copy in the node cache and uploaded when the command ends.

    Only under the CLI, and only the first call of a command counts: a stage run by another (the demo's
    ``prepare`` and ``train``) logs into the outer command's file. Returns the (local) log file's path, or None."""
    if not state.active:
        return None
    if state.log_path is not None:
        return state.log_path
    from lookahead_ray import storage

    if storage.is_uri(directory):
        state.log_remote = storage.join(str(directory), *Path(LOG_FILE).parts)
        key = hashlib.sha256(state.log_remote.encode()).hexdigest()[:16]
        path = storage.cache_root() / "logs" / key / "lookahead.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):  # appended to the run's earlier log, as for a local directory
            path.write_bytes(storage.read_bytes(state.log_remote))
    else:
        path = Path(directory).resolve() / LOG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG)
    state.file_handler, state.log_path = handler, path
    logging.getLogger().addHandler(handler)
    log.addHandler(handler)
    log.info("lookahead-ray %s (pid %d)", " ".join(sys.argv[1:]), os.getpid())
    quiet_libraries()
    return path


def quiet_libraries() -> None:
    """Libraries that print to the console through their own handlers keep only critical records there, and
    every library's records reach the log file (``-v`` shows them). Called again after Ray and Ray Data start:
    they install (and reset) their handlers late."""
    if not state.active:
        return
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if state.file_handler is not None and not logger.propagate and state.file_handler not in logger.handlers:
            logger.addHandler(state.file_handler)
        for handler in logger.handlers:
            # Not even their errors: a failure reaches the CLI, which prints it as one line (or the traceback's
            # tail and the log's path); Ray Data's executor tracebacks of a row error would bury that line.
            if not state.verbose and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.CRITICAL)
    if state.verbose:
        return
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = sys.stderr.isatty()  # one bar for the whole dataset, none per operator
        context.enable_operator_progress_bars = False
        context.print_on_execution_start = False


def after_ray_init() -> None:
    """Route Ray's worker output (what workers and actors print) into the log file instead of the console."""
    if not state.active or state.verbose:
        return
    quiet_libraries()
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # Ray moved its dispatcher: worker output stays on the console, nothing is lost
        log.debug("Ray's worker output dispatcher was not found; worker output stays on the console")
        return
    workers = logging.getLogger("ray.workers")

    def to_log_file(data: dict[str, Any]) -> None:
        source = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({source + ' ' if source else ''}pid={data.get('pid')}, ip={data.get('ip')})"
        level = logging.WARNING if data.get("is_err") else logging.INFO
        for line in data.get("lines", []):
            workers.log(level, "%s %s", prefix, line)

    workers.propagate = False  # file only: the console handler would otherwise show warnings written to stderr
    if state.file_handler is not None and state.file_handler not in workers.handlers:
        workers.addHandler(state.file_handler)
    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if not printers:  # log_to_driver=False: workers' output is not sent to this process at all
        return
    state.ray_printer = state.ray_printer or printers[0]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_log_file)


def ray_logs_dir() -> str | None:
    """Ray's own session logs (raylet, GCS, every worker's .out/.err), when this process runs Ray."""
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            return ray._private.worker.global_worker.node.get_logs_dir_path()
    return None


def stage(tag: str, message: str) -> None:
    """One stage line on stdout (and in the log file): ``[tag HH:MM:SS] message``."""
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {message}", flush=True)
    log.info("[%s] %s", tag, message)


def progress(total: int | None, description: str, unit: str, **kwargs: Any) -> Any:
    """A tqdm bar on stderr with rate and ETA; shown on terminals only (a pipe or CI log gets the stage lines)."""
    from tqdm.auto import tqdm

    options = {"file": sys.stderr, "dynamic_ncols": True, "disable": None} | kwargs
    return tqdm(total=total, desc=description, unit=unit, **options)


PROGRESS_NAMESPACE = "lookahead_ray"


class _ProgressBoard:
    """A Ray actor (no CPU) that rank 0 sends each optimizer step to, wherever it runs, and the driver polls."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def put(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def take(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        return records


class TrainingProgress:
    """What the driver knows of a run's progress: the board's actor name (None outside the CLI) and the last
    optimizer step rank 0 sent to it."""

    def __init__(self, name: str | None = None) -> None:
        self.name, self.step = name, None


@contextlib.contextmanager
def training_progress(total_steps: int, description: str) -> Iterator[TrainingProgress]:
    """A bar of optimizer steps (loss, tokens/s); yields where the training loop reports to (outside the CLI: no
    bar, no actor)."""
    if not state.active:
        yield TrainingProgress()
        return
    import uuid

    import ray

    seen = TrainingProgress(f"lookahead-progress-{uuid.uuid4().hex[:12]}")
    board = ray.remote(num_cpus=0)(_ProgressBoard).options(name=seen.name, namespace=PROGRESS_NAMESPACE).remote()
    bar = progress(total_steps, description, "step")
    done = threading.Event()

    def follow() -> None:
        while not done.wait(0.5):
            with contextlib.suppress(Exception):  # the bar is a convenience: never fail a run over it
                advance(bar, ray.get(board.take.remote(), timeout=10), seen)
        with contextlib.suppress(Exception):
            advance(bar, ray.get(board.take.remote(), timeout=10), seen)

    thread = threading.Thread(target=follow, name="lookahead-train-progress", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(timeout=15)
        bar.close()
        with contextlib.suppress(Exception):
            ray.kill(board)


def progress_board(name: str) -> Any:
    """Rank 0's side of :func:`training_progress`: the board's actor handle (``put.remote(record)``), or None."""
    import ray

    try:
        return ray.get_actor(name, namespace=PROGRESS_NAMESPACE)
    except ValueError:  # the driver is gone or has no bar: training goes on without it
        return None


def advance(bar: Any, records: list[dict[str, Any]], seen: TrainingProgress | None = None) -> None:
    for record in records:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            bar.n = int(record["step"])
            if seen is not None:
                seen.step = bar.n
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}", refresh=False)
    if records:
        bar.refresh()


def summary(lines: list[str]) -> None:
    """The closing block: what was written where and the headline numbers, wall time and where the logs are."""
    elapsed = time.perf_counter() - state.started
    block = ["", f"summary ({elapsed:.0f} s):", *(f"  {line}" for line in lines)]
    if state.log_remote is not None:
        block.append(f"  log: {state.log_remote} (uploaded at exit; local copy {state.log_path})")
    elif state.log_path is not None:
        block.append(f"  log: {state.log_path}")
    ray_logs = ray_logs_dir()
    if ray_logs and not state.verbose:
        block.append(f"  Ray's session logs: {ray_logs}")
    print("\n".join(block), flush=True)
    for line in lines:
        log.info("summary: %s", line)


def raised_in_ray(exc: BaseException) -> BaseException:
    """The error itself when it was raised inside a Ray task or actor: Ray re-raises it as a ``RayTaskError`` that
    is also an instance of its class, but whose message is the remote traceback. Its one line is the cause's."""
    while type(exc).__name__.startswith("RayTaskError") and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


def log_failure(command: str, exc: BaseException) -> None:
    """The full traceback of an error shown on the console as one line, into the log file (when it can be
    written: on a full disk it cannot, and the console says so)."""
    if state.file_handler is None:
        return
    log.error("lookahead-ray %s failed:\n%s", command, "".join(traceback.format_exception(exc)))
    try:
        state.file_handler.flush()
    except OSError as error:
        state.file_handler.handleError(logging.makeLogRecord({"msg": str(error)}))


def report_failure(command: str, exc: BaseException) -> None:
    """An unexpected error: the full traceback in the log file, its last lines and the file's path on stderr."""
    text = "".join(traceback.format_exception(exc))
    if state.log_path is None or state.verbose:
        print(text, end="", file=sys.stderr)
        return
    log.error("lookahead-ray %s failed:\n%s", command, text)
    tail = text.rstrip("\n").splitlines()[-TRACEBACK_TAIL_LINES:]
    print(f"lookahead-ray {command}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
          + "\n".join(f"  {line}" for line in tail)
          + f"\nfull traceback and Ray's worker output: {state.log_path}", file=sys.stderr)
