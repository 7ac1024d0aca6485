"""What a person sees of a `braintumor` command, and where the rest goes.

The console shows the stage's own messages (the project's `components.*` and `flows.*` loggers: progress with an
ETA, results, warnings) and the command's result. Everything else, the libraries' chatter included, goes to one log
file per stage, `logs/<stage>.log`: Great Expectations' INFO lines, Python warnings, and what native code writes
straight to the process's stdout and stderr (TensorFlow's C++ logs, CUDA probing on a machine with no GPU), which only
a file-descriptor redirect can catch. `-v` keeps everything on the console, as before.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

LOG_DIR = Path("logs")
PROJECT_LOGGERS = ("components", "flows", "bench")  # their records reach the console; every logger's reach the file
FLOWS_DIR = Path(__file__).resolve().parent
# Prefect's run loggers carry both the flows' own messages (get_run_logger() in flows/) and Prefect's state chatter
# ("Finished in state Completed()"); only the first kind reaches the console.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
CONSOLE_FORMAT = "%(asctime)s %(stage)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Native libraries read these when they load: TensorFlow's C++ logger then skips INFO (its oneDNN and CPU-feature
# notices). What it still writes (warnings, CUDA probing errors) goes to the log file with the rest.
NATIVE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1"}


@dataclass
class Console:
    """The person's streams (the process's original stdout and stderr) and the stage's log file."""
    out: TextIO
    err: TextIO
    log_file: Path | None


class _ForThePerson(logging.Filter):
    """Passes the project's own records, naming the stage on each."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in PROJECT_LOGGERS or (
            record.name.startswith(RUN_LOGGERS) and Path(record.pathname).resolve().is_relative_to(FLOWS_DIR))
        record.stage = getattr(record, "stage", self.stage)
        return ours


class _ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS stage: message`; a line relayed from a stage's own console (`extra={"relayed": True}`) as it
    came, since it carries its own time and stage."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if getattr(record, "relayed", False) else super().format(record)


def stage_log_name(stage: str) -> str:
    """`train@custom_cnn` (DVC's name) or `train custom_cnn` -> `train-custom_cnn`: the same file for both."""
    return "-".join(stage.replace("@", " ").split())


def _has_descriptors() -> bool:
    """False when stdout/stderr are in-memory objects (a test's captured output): there is no fd to redirect."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


@contextmanager
def stage_console(stage: str, verbose: bool, log_dir: Path = LOG_DIR):
    """Inside the block: project messages on the console, everything else in log_dir/<stage>.log (see the module
    docstring). Restores the process's streams and logging on exit. Yields the Console."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        root.handlers, root.level = [handler], logging.DEBUG
        try:
            yield Console(sys.stdout, sys.stderr, None)
        finally:
            root.handlers, root.level = saved_handlers, saved_level
        return

    for key, value in NATIVE_ENV.items():
        os.environ.setdefault(key, value)
    log_file = Path(log_dir) / f"{stage_log_name(stage)}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    redirect = _has_descriptors()
    saved_fds = ()
    if redirect:  # the person keeps a copy of the original streams; fds 1 and 2 now lead to the log file
        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds = (os.dup(1), os.dup(2))
        target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, 1)
        os.dup2(target, 2)
        os.close(target)
        console = Console(os.fdopen(os.dup(saved_fds[0]), "w", buffering=1),
                          os.fdopen(os.dup(saved_fds[1]), "w", buffering=1), log_file)
    else:
        console = Console(sys.stdout, sys.stderr, log_file)

    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    to_console = logging.StreamHandler(console.err)
    to_console.setFormatter(_ConsoleFormatter(CONSOLE_FORMAT, datefmt="%H:%M:%S"))
    to_console.addFilter(_ForThePerson(stage))
    to_console.setLevel(logging.INFO)
    # Prefect, imported later by the flow commands, keeps a root logger that already has handlers like these.
    root.handlers, root.level = [to_file, to_console], logging.INFO
    logging.captureWarnings(True)  # warnings.warn from libraries: to the file, as logger py.warnings
    try:
        yield console
    finally:
        logging.captureWarnings(False)
        root.handlers, root.level = saved_handlers, saved_level
        to_file.close()
        if redirect:
            sys.stdout.flush()
            sys.stderr.flush()
            console.out.close()
            console.err.close()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
