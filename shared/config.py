"""Typed dataclass configs from `--config file.yaml` plus command-line overrides.

Each stage has one dataclass; every field carries a short help text in its metadata and
the dataclass validates itself in `__post_init__`. Flags are generated from the fields
(`max_length` -> `--max-length`), a YAML file may set any field, flags given on the
command line win, and unknown keys are rejected with the list of known ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
GIVEN = "_given_fields"  # attribute load_config sets on the config it returns


def _base_type(hint: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as `int | None`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", help="YAML file with any of the options below; flags override it"
    )
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument(
        "--local_rank", "--local-rank", dest="launcher_local_rank", type=int, help=argparse.SUPPRESS
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(
                flag,
                type=_parse_bool,
                nargs="?",
                const=True,
                default=argparse.SUPPRESS,
                help=f"{text} (default: {default})",
            )
        else:
            shown = "required" if required else f"default: {default}"
            parser.add_argument(
                flag,
                type=kind,
                default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"),
                help=f"{text} ({shown})" + (" [may be null]" if optional else ""),
            )
    return parser


def load_config(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Parse argv into `cls`: YAML file values first, then explicit flags."""
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    args.pop("launcher_local_rank", None)
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            parser.error(f"{config_file}: expected a mapping of option: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(args)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"unknown option(s) {unknown}; known: {sorted(known)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        parser.error(
            "missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing)
        )
    try:
        config = cls(**values)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
    # a plain attribute, not a field: asdict/to_dict leave it out of the saved config
    object.__setattr__(config, GIVEN, frozenset(values))
    return config


def given_fields(config: Any) -> frozenset[str]:
    """The fields the YAML file or the command line set (not defaults): another source of
    the same setting, such as a DeepSpeed JSON, may fill the others but must not contradict
    these. Empty for a config built in Python rather than by `load_config`."""
    return getattr(config, GIVEN, frozenset())


def to_dict(config: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None) -> Any:
    """A dataclass field with its command-line help."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})
