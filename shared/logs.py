"""Log records and progress bars that share stderr cleanly, and quiet third-party libraries.

On a terminal a bar redraws in place and a log record goes through tqdm, which clears the
bars, prints the record on its own line and redraws them. When stderr is a file or a pipe (a
SLURM log) a bar instead prints one plain, timestamped line every LOG_FILE_INTERVAL_S
seconds and a last one when it closes: no carriage returns, so every record and every
progress report is a line of its own that grep and tail show whole.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import resource
import sys
import time
import warnings
from collections.abc import Iterator

from tqdm import tqdm

VERBOSE_ENV = "REFDPO_VERBOSE"  # "1" while --verbose is on, for code that has no config
LOG_FILE_INTERVAL_S = 30.0  # TQDM_MININTERVAL overrides it
LINE_FORMAT = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)
_REDRAW = re.compile(r"\r|\x1b\[A")  # what tqdm writes to return to the start of its line
_WORRYING = re.compile(r"warn|error|fail|exception", re.IGNORECASE)


class TqdmHandler(logging.StreamHandler):
    """A StreamHandler whose records go through tqdm.write: a bar drawn on the same terminal is
    cleared first and redrawn after, so no record is left behind a bar's carriage return."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class _Lines:
    """Where a bar writes when stderr is not a terminal: each redraw becomes one whole line
    (tqdm's carriage returns and padding dropped, an unchanged redraw skipped)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = _REDRAW.sub("", text).strip()
        if line and line != self.last:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            self.stream.flush()
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr: redrawn in place on a terminal, a line every
    LOG_FILE_INTERVAL_S seconds in a log file. `kwargs` go to tqdm (e.g. `initial`)."""
    stream = sys.stderr
    if not enabled or stream is None:
        return tqdm(total=total, desc=desc, unit=unit, disable=True, **kwargs)
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
    interval = float(os.environ.get("TQDM_MININTERVAL", LOG_FILE_INTERVAL_S))
    options = {"mininterval": interval, "maxinterval": interval, "bar_format": LINE_FORMAT}
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), **options | kwargs)


class _WarningsAndAbove(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_INFO_DROPPED = _WarningsAndAbove()
_BARS_AT_START: dict[str, bool] = {}  # each library's bar setting before we first changed it


def _set_bars(name: str, module, verbose: bool) -> None:
    """Turn a library's bars off, or back to how they were before we turned them off."""
    enabled = module.is_progress_bar_enabled()
    _BARS_AT_START.setdefault(name, enabled)
    wanted = _BARS_AT_START[name] if verbose else False
    if wanted != enabled:
        with warnings.catch_warnings():  # an env var that forces bars on or off warns here
            warnings.simplefilter("ignore")
            (module.enable_progress_bar if wanted else module.disable_progress_bar)()


def quiet_libraries(verbose: bool) -> None:
    """Unless verbose: no transformers/datasets/hub progress bars (pure noise in a log: the
    weights of a local model "loading" in a fraction of a second), and DeepSpeed's INFO lines
    dropped. Their warnings and errors still show; verbose puts everything back as it was
    and sets REFDPO_VERBOSE=1 for code that has no config to read.

    DeepSpeed's logger sets its own level and handler when deepspeed is first imported, and
    logs during that import; a filter on the logger survives both, so calling this before the
    import quiets the import too.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if verbose:
        deepspeed_logger.removeFilter(_INFO_DROPPED)
    else:
        deepspeed_logger.addFilter(_INFO_DROPPED)
    # MLflow sets its loggers' level from MLFLOW_LOGGING_LEVEL when imported; its SQLite
    # store logs "Creating initial MLflow database tables..." and alembic's migrations at INFO
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        pass
    else:
        _set_bars("transformers", transformers_logging, verbose)  # also the hub's download bars
    try:
        from datasets.utils import logging as datasets_logging
    except ImportError:
        pass
    else:
        _set_bars("datasets", datasets_logging, verbose)


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    """Unless REFDPO_VERBOSE=1: hold back what is print()ed to stdout meanwhile, but for lines
    that warn or report an error. For a library that prints chatter instead of logging it
    (DeepSpeed on CPU: "DeepSpeed ...shm_comm_op built successfully"). A logger keeps the
    stream it was given, so logged warnings are untouched."""
    if os.environ.get(VERBOSE_ENV) == "1":
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        for line in held.getvalue().splitlines():
            if _WORRYING.search(line):
                print(line)


def stdout_closed() -> int:
    """After a BrokenPipeError on stdout (the reader went away, as in `| head`): point stdout
    at /dev/null so that the flush at exit cannot fail again, and return 141, the status a
    shell reports for a program ended by SIGPIPE (128 + 13)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return 141


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated, or peak resident set size of this process on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)
