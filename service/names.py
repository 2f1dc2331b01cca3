"""The one rule for caller-supplied names that the service keeps or builds paths from.

Every string a caller sends is hostile until it matches a pattern here (model names and versions
have theirs in models/artifact/store.py). Ids that key stored records (request ids, capture ids)
are made by the server; a caller's own request id is only echoed back, after this check. A path is
built only from checked parts, and `path_under` proves it stays under its root.
"""
from __future__ import annotations

import re
import uuid
from pathlib import Path

from models.errors import TuneserveError

# A caller's request id (the OIP `id`, echoed in the answer): letters, digits and `._:@+=-`, no
# separators, no NUL, no unicode look-alikes, at most 128 characters.
CALLER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}$")
CALLER_ID_HELP = "1-128 characters: letters, digits and . _ : @ + = -, starting with a letter or digit"
# What the server makes (`new_request_id`): 32 hex digits, with `-<index>` for a batch's images.
REQUEST_ID = re.compile(r"^[0-9a-f]{32}(-[0-9]{1,5})?$")
# X-Client-Id (sticky canary routing): the same alphabet as a caller's request id.
CLIENT_ID = CALLER_ID


class InvalidName(TuneserveError):
    """A caller-supplied id or name that does not match its pattern (400)."""

    status = 400


class OutsideRoot(TuneserveError):
    """A path that would leave its root: never built (400)."""

    status = 400


def new_request_id() -> str:
    return uuid.uuid4().hex


def checked(value: str | None, pattern: re.Pattern, what: str, rule: str) -> str | None:
    """`value` when absent or matching `pattern`; else InvalidName naming `what` and the rule.
    The message shows at most 40 characters of the refused value, escaped."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = repr(value[:40]) + ("…" if isinstance(value, str) and len(value) > 40 else "")
        raise InvalidName(f"{what} {shown} is not valid: {rule}")
    return value


def caller_id(value: str | None) -> str | None:
    """A caller's request id, checked (None when not sent)."""
    return checked(value, CALLER_ID, "request id", CALLER_ID_HELP)


def path_under(root: Path, *parts: str) -> Path:
    """`root/part/part…`, each part one plain path component, and the result inside `root`
    (symlinks resolved); else OutsideRoot. Parts must already have passed their own pattern;
    this is the last line, not the first."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise OutsideRoot(f"{part!r} is not a plain file name")
    base = root.resolve()
    candidate = base.joinpath(*parts).resolve()
    if not candidate.is_relative_to(base) or candidate == base:
        raise OutsideRoot(f"{'/'.join(parts)!r} leaves its root")
    return candidate
