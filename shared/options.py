"""The parts of an option: its field, the spellings of its name, its values, and what refdpo
does with an option of TRL or transformers that has no field (`Foreign`).

shared/config.py builds the parser and reads YAML from these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Callable
from typing import Any

# --- what refdpo does with an option of TRL / transformers that has no field


@dataclasses.dataclass(frozen=True)
class Foreign:
    """`kind` is "refuse" (one sentence, exit 2), "ignore" (a logged note), "accept" (no
    effect here and nothing to say) or "translate" (`to` maps the value to fields). Values
    in `quiet` (the default, or what refdpo does anyway) pass without a word."""

    kind: str
    reason: str = ""
    quiet: tuple = ()
    to: Callable[[Any], dict[str, Any]] | None = None
    help: str = ""  # shown in --help when given


def refuse(reason: str, quiet: tuple = ()) -> Foreign:
    return Foreign("refuse", reason, quiet)


def ignore(reason: str, quiet: tuple = ()) -> Foreign:
    return Foreign("ignore", reason, quiet)


def accept(reason: str) -> Foreign:
    return Foreign("accept", reason)


def translate(to: Callable[[Any], dict[str, Any]], help: str = "") -> Foreign:
    return Foreign("translate", to=to, help=help)


# --- values


def base_type(hint: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as `int | None`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def value_key(value: Any) -> Any:
    """A comparable spelling of a value from either source: YAML's `true` and the command
    line's "True" are both "true"; a JSON object given as text equals the mapping."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True).lower()
    if value is None:
        return None
    return str(value).lower()


def _as(kind: type, value: Any) -> Any:
    """`value` as `kind`, or ValueError saying what was expected. Bools are not numbers, and
    an integral float (2.0, "1e3") counts as an integer."""
    if kind is bool:
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        return parse_bool(value)
    if isinstance(value, bool) and kind in (int, float):
        raise ValueError(f"expected a number, got {value!r}")
    if kind is int:
        number = value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    raise ValueError(f"expected an integer, got {value!r}") from None
        if isinstance(number, float) and number.is_integer():
            return int(number)
        if isinstance(number, int):
            return number
        raise ValueError(f"expected an integer, got {value!r}")
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def convert(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """A value from the command line (text) or YAML (any type) as field f's type."""
    kind, optional = base_type(hint)
    meta = f.metadata
    if isinstance(value, dict) and meta.get("mapping"):  # a YAML mapping for a JSON option
        value = json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        if not meta.get("many"):
            raise ValueError(f"expected one value, got the list {list(value)}")
        value = ",".join(str(v) for v in value)
    synonyms = meta.get("synonyms") or {}
    if value_key(value) in synonyms:
        value = synonyms[value_key(value)]
    if optional and isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    if value is None:
        if optional:
            return None
        raise ValueError("needs a value (null is not one)")
    value = _as(kind, value)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
    return value


# --- names


def dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def names_of(f: dataclasses.Field) -> list[str]:
    """Every accepted spelling of field f (underscore form), canonical first."""
    canonical = f.metadata.get("flag") or f.name
    return list(dict.fromkeys([canonical, *f.metadata.get("aliases", ()), f.name]))


def flag_name(cls: type, field: str) -> str:
    """The canonical flag of a field, as --help shows it: `--per-device-train-batch-size`."""
    return dashed(names_of(next(f for f in dataclasses.fields(cls) if f.name == field))[0])


def closest(name: str, known: list[str]) -> list[str]:
    """The known names a mistyped one most likely meant: the one it begins, else those it
    abbreviates by initials (`lr`: learning_rate; a long name is the likelier one), else
    difflib's nearest."""
    starting = [k for k in known if k.startswith(name)]
    if len(starting) == 1:
        return starting
    initials = [k for k in known if "_" in k and "".join(p[0] for p in k.split("_")) == name]
    if initials:
        return sorted(initials, key=len, reverse=True)[:2]
    return difflib.get_close_matches(name, known, n=2, cutoff=0.6)


def normalize_argv(argv: list[str]) -> list[str]:
    """`--per_device_train_batch_size=2` -> `--per-device-train-batch-size=2` (option names
    only; values and everything after `--` stay as typed)."""
    out = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            token = dashed(name) + eq + value
        out.append(token)
    return out


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    choices: tuple | None = None,
    *,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    path: str | None = None,
    synonyms: dict | None = None,
    many: bool = False,
    mapping: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with its command-line help.

    flag: the canonical name when it is not the field's (TRL's `per_device_train_batch_size`);
    aliases: other accepted names; path: "path" or "path_or_hub" (a hub name allowed) for
    values that are paths, relative to a YAML file's folder when they come from one;
    synonyms: accepted spellings of values (lower case) -> the value; many: a list on the
    command line or in YAML, stored comma-joined; mapping: a JSON object on the command line
    or a mapping in YAML, stored as JSON text."""
    metadata = {
        "help": help,
        "choices": choices,
        "flag": flag,
        "aliases": aliases,
        "path": path,
        "synonyms": synonyms,
        "many": many,
        "mapping": mapping,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, metadata=metadata)
