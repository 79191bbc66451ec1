"""Logs and progress bars on one stderr: a record is always a line of its own (terminal or log
file), bars in a log file print plain lines, other libraries are quiet unless --verbose, and
`refdpo inspect | head` ends without a traceback."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from refdpo.shared import logs
from refdpo.shared.dist import setup_logging

FORMAT = "%(levelname)s %(name)s: %(message)s"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logger_on(monkeypatch):
    """A logger writing through TqdmHandler to a fake stderr (a file, or a terminal)."""
    log = logging.getLogger("refdpo.test-logs")

    def make(stream: io.StringIO) -> logging.Logger:
        monkeypatch.setattr(sys, "stderr", stream)
        handler = logs.TqdmHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT))
        log.handlers = [handler]
        log.propagate = False
        log.setLevel(logging.INFO)
        return log

    yield make
    log.handlers, log.propagate = [], True


def record_mid_bar(log: logging.Logger) -> None:
    bar = logs.progress_bar(100, "precompute train", "pair", mininterval=0)
    bar.update(40)
    log.warning("dataset row 7 dropped: identical")
    bar.update(60)
    bar.close()


def test_record_in_a_log_file_is_its_own_line(logger_on):
    stderr = io.StringIO()
    record_mid_bar(logger_on(stderr))
    text = stderr.getvalue()
    lines = text.splitlines()
    assert "\r" not in text  # the bar printed plain lines, no redraws
    assert "WARNING refdpo.test-logs" in text
    record = next(line for line in lines if "dropped" in line)
    assert record.startswith("WARNING ") and record.endswith("identical")
    progress = [line for line in lines if "precompute train:" in line]
    assert progress[0].endswith("0/100 [00:00<?, ?pair/s]")  # each a timestamped line
    assert " 100% 100/100 " in progress[-1]
    assert lines.index(progress[-1]) > lines.index(record)


def test_record_on_a_terminal_is_drawn_on_its_own_line(logger_on):
    stderr = Terminal()
    record_mid_bar(logger_on(stderr))
    # what the terminal shows: after each line's last carriage return
    shown = [line.rsplit("\r", 1)[-1] for line in stderr.getvalue().split("\n")]
    record = "WARNING refdpo.test-logs: dataset row 7 dropped: identical"
    assert record in [line.strip() for line in shown]
    assert "\r" in stderr.getvalue()  # the bar itself redraws in place
    assert shown[-2].startswith("precompute train: 100%")


def test_bar_in_a_log_file_reports_at_most_every_interval(logger_on, monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    stderr = io.StringIO()
    logger_on(stderr)
    bar = logs.progress_bar(1000, "train", "step")
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert bar.mininterval == logs.LOG_FILE_INTERVAL_S
    assert len(stderr.getvalue().splitlines()) == 2  # the start and the end


def test_disabled_bar_writes_nothing(logger_on):
    stderr = io.StringIO()
    logger_on(stderr)
    bar = logs.progress_bar(10, "train", "step", enabled=False)
    bar.update(10)
    bar.close()
    assert stderr.getvalue() == ""


def test_verbose_sets_the_env_and_lets_deepspeed_info_through(monkeypatch):
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    info = deepspeed_logger.makeRecord("DeepSpeed", logging.INFO, "f", 1, "Setting ...", (), None)
    warning = deepspeed_logger.makeRecord("DeepSpeed", logging.WARNING, "f", 1, "w", (), None)
    try:
        setup_logging(0, 1, verbose=True)
        assert os.environ[logs.VERBOSE_ENV] == "1"
        assert deepspeed_logger.filter(info)
        setup_logging(0, 1)
        assert logs.VERBOSE_ENV not in os.environ
        assert not deepspeed_logger.filter(info) and deepspeed_logger.filter(warning)
    finally:
        setup_logging(0, 1, verbose=True)  # other tests see the libraries as they were
        monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)


def test_quiet_prints_keeps_only_warnings(capsys, monkeypatch):
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    with logs.quiet_prints():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("[WARNING] cpu_adam requires the 'ninja' command")
    assert capsys.readouterr().out == "[WARNING] cpu_adam requires the 'ninja' command\n"
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    with logs.quiet_prints():
        print("built successfully")
    assert capsys.readouterr().out == "built successfully\n"


QUIET_THEN_VERBOSE = """
import logging, sys
from refdpo.shared.dist import setup_logging
from refdpo.shared.models import load_model
import torch

def phase(verbose):
    setup_logging(0, 1, verbose=verbose)
    load_model(sys.argv[1], None, "fp32", "sdpa", torch.device("cpu"))
    import deepspeed
    from deepspeed.utils.logging import logger, set_log_level_from_string
    set_log_level_from_string("info")  # as a DeepSpeed config's log_level does
    logger.info("ds-info-line")
    logger.warning("ds-warning-line")
    logging.getLogger("refdpo.test").info("refdpo-info-line")
    logging.getLogger("otherlib").info("otherlib-info-line")  # a library's logger left NOTSET
    sys.stdout.flush()
    sys.stderr.flush()

phase(False)
print("=== verbose ===", flush=True)
print("=== verbose ===", file=sys.stderr, flush=True)
phase(True)
"""


def test_other_libraries_are_quiet_unless_verbose(tmp_path, tiny_model_dir):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", logs.VERBOSE_ENV):
        env.pop(name, None)
    with open(tmp_path / "stderr.log", "w") as err:  # a file, as under SLURM
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(QUIET_THEN_VERBOSE), str(tiny_model_dir)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=300,
        )  # fmt: skip
    stderr = (tmp_path / "stderr.log").read_text()
    assert done.returncode == 0, stderr
    quiet_err, verbose_err = stderr.split("=== verbose ===")
    quiet_out, verbose_out = done.stdout.split("=== verbose ===")  # DeepSpeed logs to stdout
    assert "Loading weights" not in quiet_err and "Loading weights" in verbose_err
    assert "ds-info-line" not in quiet_out and "ds-info-line" in verbose_out
    assert "ds-warning-line" in quiet_out  # quiet is not silent
    assert "otherlib-info-line" not in quiet_err and "otherlib-info-line" in verbose_err
    assert "INFO refdpo.test: refdpo-info-line" in quiet_err


def test_inspect_into_a_closed_pipe_ends_quietly(shards):
    inspect = subprocess.Popen(
        [sys.executable, "-m", "refdpo.shared.cli", "inspect", str(shards / "train")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    inspect.stdout.close()  # the reader is gone before the first line, like `| head -0`
    stderr = inspect.stderr.read()
    assert inspect.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
