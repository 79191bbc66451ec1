"""Typed dataclass configs from `--config file.yaml` plus command-line overrides.

Each stage has one dataclass; every field carries a short help text in its metadata and
the dataclass validates itself in `__post_init__`. A field is set by its canonical flag
(TRL's or transformers' name where one exists: `micro_batch_size` is
`--per-device-train-batch-size`), by its own name or by an alias (`--micro-batch-size`),
spelled with dashes or underscores. A YAML file may set any field under any of those names,
flags given on the command line win, and unknown keys are rejected naming the closest known
one. Options of TRL or transformers that have no field are in the class's `FOREIGN` table:
refused with the reason, ignored with a logged note, or translated into fields.

Values from the file are converted to the field's type as the command line's are (`5e-6`, a
string in YAML 1.1, is a float), and relative paths in a file are relative to the file's
folder (see `_yaml_path`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from refdpo.shared.errors import UsageError
from refdpo.shared.options import (
    Foreign,
    accept,
    base_type,
    closest,
    convert,
    dashed,
    flag_name,
    ignore,
    names_of,
    normalize_argv,
    option,
    parse_bool,
    refuse,
    translate,
    value_key,
)

__all__ = [  # the option helpers are re-exported: stage configs import them from here
    "Foreign", "accept", "build_parser", "config_notes", "flag_name", "given_fields", "ignore",
    "load_config", "option", "parse_bool", "refuse", "to_dict", "translate",
]  # fmt: skip

T = TypeVar("T")
GIVEN = "_given_fields"  # attribute load_config sets on the config it returns
NOTES = "_config_notes"  # the same, for notes to log once logging is set up


# --- the parser


METAVARS = {int: "N", float: "X", str: "TEXT", bool: "BOOL"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line, without the usage block (which lists every option)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # never split a flag such as --max-length at its dashes
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _help_text(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return f"{text} (required)"
    if "default" not in text:  # where the text says it, it says it better than the value
        shown = f.default
        if shown is None or isinstance(shown, bool):
            shown = str(shown).lower()
        elif isinstance(shown, str) and (not shown or any(c.isspace() for c in shown)):
            shown = repr(shown)
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """Every spelling of every field and every FOREIGN name is an option; --help shows each
    field once, under its canonical flag. Values stay text here (`convert` types them)."""
    parser = _Parser(
        prog=prog,
        description=description,
        usage=f"{prog} [--config FILE] [options]",
        formatter_class=_Help,
        allow_abbrev=False,
        epilog="Options take dashes or underscores (--learning-rate, --learning_rate); "
        "older refdpo names and TRL's are accepted too (README: 'Coming from TRL').",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file with any of the options below; flags win"
    )
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument("--local-rank", dest="launcher_local_rank", help=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = base_type(hints[f.name])[0]
        choices = f.metadata.get("choices")
        metavar = f.metadata.get("metavar") or {"path": "DIR", "path_or_hub": "PATH"}.get(
            f.metadata.get("path"),
            "{" + ",".join(map(str, choices)) + "}" if choices else METAVARS[kind],
        )
        for i, name in enumerate(names_of(f)):
            shown = _help_text(f) if i == 0 else argparse.SUPPRESS
            _add(parser, name, kind is bool, bool(f.metadata.get("many")), shown, metavar)
    for name, rule in getattr(cls, "FOREIGN", {}).items():  # a bare flag is "true"
        _add(parser, name, True, False, rule.help or argparse.SUPPRESS, None)
    return parser


def _add(parser, name: str, flag_like: bool, many: bool, text: str, metavar) -> None:
    """`--name` (and for a flag-like option `--no-name`, HfArgumentParser's spelling of false)."""
    dest = "opt:" + name
    if not flag_like:
        nargs = "+" if many else None
        parser.add_argument(dashed(name), dest=dest, nargs=nargs, help=text, metavar=metavar)
        return
    parser.add_argument(
        dashed(name), dest=dest, nargs="?", const="true", help=text, metavar=metavar or "BOOL"
    )
    parser.add_argument(
        dashed("no_" + name), dest=dest, action="store_const", const="false",
        help=argparse.SUPPRESS,
    )  # fmt: skip


# --- reading


def _read_yaml(path: str) -> tuple[dict, dict[str, int]]:
    """The file's mapping and the line of each key; ValueError in one sentence otherwise."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except OSError as err:
        raise UsageError(f"--config {path}: cannot be read ({err.strerror})") from None
    try:
        loaded = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{path}{where}: not valid YAML ({problem})") from None
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a mapping of option: value")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return loaded, lines


def _yaml_path(value: str, folder: str, kind: str) -> str:
    """A relative path from a YAML file, relative to the file's folder. A value of a
    "path_or_hub" option (dataset, model) that reads as a hub name (`org/name`: no leading `.`,
    no extension) stays as written unless that file or folder exists beside the YAML file."""
    if os.path.isabs(value) or value == "auto":
        return value
    resolved = os.path.normpath(os.path.join(folder, value))
    hub_like = "/" in value and not value.startswith(".") and not Path(value).suffix
    if kind == "path_or_hub" and hub_like and not os.path.exists(resolved):
        return value
    return resolved


def _collect(cls, source: dict[str, Any], where: Callable[[str], str], short=dashed):
    """{field: value} from one source (the file or the command line), typed, with the
    FOREIGN names applied; and the notes to log. `where(name)` says where a name was given,
    `short(name)` the same after the first one. A null value leaves an option that cannot
    be null at its default; two spellings of one field that disagree are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    owner = {name: f.name for f in fields.values() for name in names_of(f)}
    foreign: dict[str, Foreign] = getattr(cls, "FOREIGN", {})
    values: dict[str, tuple[Any, str]] = {}
    notes: list[str] = []

    def put(field: str, raw: Any, name: str) -> None:
        if raw is None and not base_type(hints[field])[1]:
            return
        try:
            value = convert(fields[field], hints[field], raw)
        except ValueError as err:
            raise ValueError(f"{where(name)}: {err}") from None
        if field in values and values[field][0] != value:
            raise ValueError(
                f"{where(values[field][1])} and {short(name)} set {field} differently; give one"
            )
        values[field] = (value, name)

    for name, raw in source.items():
        if name in owner:
            put(owner[name], raw, name)
            continue
        rule = foreign[name]
        if rule.kind == "accept" or value_key(raw) in {value_key(q) for q in rule.quiet}:
            continue
        if rule.kind == "refuse":
            raise ValueError(f"{where(name)}: {rule.reason}")
        if rule.kind == "ignore":
            notes.append(f"{where(name)} is ignored: {rule.reason}")
            continue
        try:
            translated = rule.to(raw)
        except ValueError as err:
            raise ValueError(f"{where(name)}: {err}") from None
        for field, value in translated.items():
            put(field, value, name)
    return {k: v for k, (v, _) in values.items()}, notes


def _check_names(parser, cls, names: list[str], where: Callable[[str], str], spell) -> None:
    """Unknown names: one error naming the closest known ones."""
    owner = {n: names_of(f)[0] for f in dataclasses.fields(cls) for n in names_of(f)}
    known = [*owner, *getattr(cls, "FOREIGN", {})]
    for name in names:
        if name not in known:
            near: list[str] = []
            for match in closest(name, known):  # one name per option, the canonical if near
                canonical = owner.get(match, match)
                if all(owner.get(n, n) != canonical for n in near):
                    near.append(match)
                elif canonical == match:
                    near = [match if owner.get(n, n) == canonical else n for n in near]
            hint = f"; did you mean {' or '.join(spell(n) for n in near)}?" if near else ""
            parser.error(f"{where(name)}{hint}")


def load_config(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Parse argv into `cls`: YAML file values first, then explicit flags."""
    parser = build_parser(cls, prog, description)
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed, extra = parser.parse_known_args(normalize_argv(argv))
    for token in extra:
        if token.startswith("-"):
            name = token.lstrip("-").split("=")[0].replace("-", "_")
            _check_names(parser, cls, [name], lambda n: f"unknown option {dashed(n)}", dashed)
        parser.error(f"unexpected argument {token!r}")
    flags = {k[4:]: v for k, v in vars(parsed).items() if k.startswith("opt:") and v is not None}
    config_file = parsed.config
    try:
        values, notes = {}, []
        if config_file:
            loaded, lines = _read_yaml(config_file)
            loaded = {str(k).replace("-", "_"): v for k, v in loaded.items()}

            def line(name: str) -> int | None:
                return lines.get(name, lines.get(name.replace("_", "-")))

            def at(name: str) -> str:
                return f"{config_file}, line {line(name)}: {name}"

            def unknown(name: str) -> str:
                return f"{config_file}, line {line(name)}: unknown option {name}"

            _check_names(parser, cls, list(loaded), unknown, str)
            values, notes = _collect(cls, loaded, at, lambda n: f"{n} (line {line(n)})")
            folder = os.path.dirname(config_file)
            for f in dataclasses.fields(cls):
                kind = f.metadata.get("path")
                if kind and isinstance(values.get(f.name), str):
                    values[f.name] = _yaml_path(values[f.name], folder, kind)
        from_flags, flag_notes = _collect(cls, flags, dashed)
    except ValueError as err:
        parser.error(str(err))
    values.update(from_flags)
    notes += flag_notes
    missing = [
        flag_name(cls, f.name)
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        parser.error("missing required option(s): " + ", ".join(missing))
    try:
        config = cls(**values)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    # plain attributes, not fields: asdict/to_dict leave them out of the saved config
    object.__setattr__(config, GIVEN, frozenset(values))
    object.__setattr__(config, NOTES, tuple(notes))
    return config


def given_fields(config: Any) -> frozenset[str]:
    """The fields the YAML file or the command line set (not defaults): another source of
    the same setting, such as a DeepSpeed JSON, may fill the others but must not contradict
    these. Empty for a config built in Python rather than by `load_config`."""
    return getattr(config, GIVEN, frozenset())


def config_notes(config: Any) -> tuple[str, ...]:
    """What load_config has to say about options it ignored, for the caller to log."""
    return getattr(config, NOTES, ())


def to_dict(config: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
