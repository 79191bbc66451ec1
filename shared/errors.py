"""What went wrong, whose it is to fix, and the exit code it gives (README: Exit codes).

A `RefdpoError` is the user's to fix: the command prints its one sentence and exits with
the class's code. Anything else raised during a run is a bug in refdpo (or in a library it
calls) and keeps its traceback; the commands never catch bare ValueError or OSError around a
run, so a programming error cannot pass for a user's mistake.

The classes that stand for bad options also derive from ValueError (and a missing path from
FileNotFoundError), so that code checking a value may raise them where a ValueError is
expected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

EXIT_USAGE = 2  # bad options, config files, DeepSpeed files, paths; unusable data; refused folder
EXIT_STEP0 = 3  # stage two's step-0 check found shards that do not match the policy
EXIT_NONFINITE = 4  # stage two stopped after too many non-finite steps in a row
EXIT_REQUEUE = 75  # stopped by a signal after saving: requeue the job (EX_TEMPFAIL)


class RefdpoError(Exception):
    """A failure the user can fix; `exit_code` is what the command returns."""

    exit_code = 1


class UsageError(RefdpoError, ValueError):
    """An option, a config file, a DeepSpeed file or a combination of them is not usable."""

    exit_code = EXIT_USAGE


class MissingPath(UsageError, FileNotFoundError):
    """A path given as an option does not exist or is not what it should be."""


class InputError(RefdpoError):
    """The data (a dataset or a shard folder) cannot be used as it is."""

    exit_code = EXIT_USAGE


class NoUsableRows(InputError):
    """Every row of a dataset was dropped; the reasons are in the message."""


class FolderRefused(RefdpoError):
    """An output or checkpoint folder holds something this run must not mix with."""

    exit_code = EXIT_USAGE


class Step0Error(RefdpoError, RuntimeError):
    """At step 0 the policy's log-probs differ from the shards' reference values."""

    exit_code = EXIT_STEP0


class NonFiniteError(RefdpoError, RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""

    exit_code = EXIT_NONFINITE


def run_command(body: Callable[[], int], logger: logging.Logger) -> int:
    """Run a command's body: a RefdpoError becomes its sentence and its exit code; any other
    exception propagates with its traceback."""
    try:
        return body()
    except RefdpoError as err:
        logger.error("%s", err)
        return err.exit_code
