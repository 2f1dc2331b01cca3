"""The API key file: where it lives and what it holds, shared by the server (service/auth.py) and
clients on the same machine (the CLI, the Python client), so neither needs the key typed in.

Format: one key per line, `name: key`; blank lines and `#` comments are ignored. The name is what
a fine-tune job records as its submitter and what quotas count per key.

Where the file is and which key a client sends come in as `KeySettings`, read from the environment
by the settings model (service/config.py), so this module reads no environment itself.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

KEYS_FILE_NAME = "api-keys"
DEFAULT_KEY_NAME = "default"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class KeyFileError(ValueError):
    """A key file or TUNESERVE_API_KEYS value that cannot be parsed."""


@dataclass(frozen=True)
class KeySettings:
    """What finding and sending a key needs (service/config.py: `key_settings()`, `Settings.keys`)."""

    home: Path  # the service home; the key file defaults to home/api-keys
    api_keys_file: Path | None = None
    api_key: str | None = None  # a key given outright (TUNESERVE_API_KEY)

    @property
    def keys_file(self) -> Path:
        return self.api_keys_file or self.home / KEYS_FILE_NAME


def parse_entry(entry: str, where: str) -> tuple[str, str]:
    """`name: key` (or `name:key`) → (name, key); KeyFileError naming `where` otherwise."""
    name, sep, key = entry.partition(":")
    name, key = name.strip(), key.strip()
    if not sep or not key:
        raise KeyFileError(f"{where}: expected 'name: key'")
    if not KEY_NAME.match(name):
        raise KeyFileError(f"{where}: key name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'")
    if len(key) < 16 or any(c.isspace() for c in key):
        raise KeyFileError(f"{where}: the key for {name!r} must be at least 16 characters without spaces")
    return name, key


def parse_keys(text: str, source: str) -> dict[str, str]:
    """The text of a key file → {name: key}; KeyFileError naming the line on a bad entry."""
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, key = parse_entry(line, f"{source} line {number}")
        if name in keys:
            raise KeyFileError(f"{source} line {number}: key name {name!r} appears twice")
        keys[name] = key
    return keys


def format_keys(keys: Mapping[str, str]) -> str:
    lines = ["# tuneserve API keys, one 'name: key' per line. Delete a line to revoke that key;",
             "# the server re-reads this file when it changes (no restart)."]
    return "\n".join(lines + [f"{name}: {key}" for name, key in keys.items()]) + "\n"


def is_local(server_url: str) -> bool:
    """Whether `server_url` names this machine (loopback or this host's name)."""
    host = (urlsplit(server_url if "//" in server_url else f"//{server_url}").hostname or "").lower()
    return host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname().lower()) or host.startswith("127.")


def client_key(server_url: str, keys: KeySettings) -> str | None:
    """The key a client sends: the key given outright; else, for a server on this machine, the key
    file's `default` key (else its first); else None. The local key file is never sent to another
    machine. An unreadable file counts as absent (the server then answers 401 saying what to send)."""
    if keys.api_key:
        return keys.api_key
    if not is_local(server_url):
        return None
    try:
        found = parse_keys(keys.keys_file.read_text(), "key file")
    except (OSError, KeyFileError):
        return None
    return found.get(DEFAULT_KEY_NAME) or next(iter(found.values()), None)
