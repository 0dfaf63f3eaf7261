"""argparse flags derived from a config dataclass, so that every default and help text lives in one place.

Each dataclass field becomes `--field-name` (underscores -> dashes) with the field's default and its
`metadata["help"]`. Types come from the annotation: bool -> `--flag/--no-flag`, `int | None` -> int that
also accepts "none", `Literal`-like choices from `metadata["choices"]`. Building the dataclass from the
parsed namespace runs its `__post_init__`, so the CLI and the Python API validate identically.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of an annotation such as `int`, `"int | None"` or `Optional[float]`."""
    if isinstance(annotation, str):  # `from __future__ import annotations` leaves strings
        parts = [p.strip() for p in annotation.split("|")]
        optional = "None" in parts
        names = [p for p in parts if p != "None"]
        if len(names) != 1 or names[0] not in _SCALARS:
            raise TypeError(f"unsupported config annotation {annotation!r}")
        return _SCALARS[names[0]], optional
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass `cls` to `parser`."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        kind, optional = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        if default is not None and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        parser.add_argument(
            flag,
            dest=f.name,
            type=_optional(kind) if optional else kind,
            default=default,
            required=f.name in required,
            choices=f.metadata.get("choices"),
            metavar=f.metadata.get("metavar"),
            help=help_text,
        )


def config_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """Build `cls` from the parsed namespace (its `__post_init__` validates)."""
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli") is not False}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})
