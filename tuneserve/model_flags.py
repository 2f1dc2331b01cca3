"""Command-line flags derived from a pydantic model's fields: one flag per field, same name with
dashes, its type, choices and help from the field, default None so that only what is given counts."""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def value_type(field: FieldInfo) -> Any:
    """`Optional[int]` → int; the type argparse converts a flag's text with."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return parse_bool if annotation is bool else annotation


def flag_help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required() or field.default in (None, ""):
        return text
    default = str(field.default).lower() if isinstance(field.default, bool) else field.default
    return f"{text} (default {default})"


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel],
                    aliases: dict[str, list[str]] | None = None, exclude: tuple[str, ...] = ()) -> None:
    """`--batch-size` for `batch_size`, and so on for every field of `model` but `exclude`."""
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        kind = value_type(field)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        options: dict[str, Any] = {"dest": name, "type": kind, "default": None, "help": flag_help(field)}
        if "enum" in extra:
            options["choices"] = extra["enum"]
        if kind is parse_bool:
            options["metavar"] = "BOOL"
        flags = ["--" + name.replace("_", "-"), *(aliases or {}).get(name, [])]
        parser.add_argument(*flags, **options)


def given_values(args: argparse.Namespace, model: type[BaseModel], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The model's fields (but `exclude`) that were given on the command line."""
    return {name: getattr(args, name) for name in model.model_fields
            if name not in exclude and getattr(args, name, None) is not None}
