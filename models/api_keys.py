"""The API key file: where it lives and what it holds, shared by the server (service/auth.py) and
clients on the same machine (the CLI, the Python client), so neither needs the key typed in.

Format: one key per line, `name: key`; blank lines and `#` comments are ignored. The name is what
a fine-tune job records as its submitter and what quotas count per key.

Location, first that applies: $TUNESERVE_API_KEYS_FILE; $TUNESERVE_HOME/api-keys;
$BENTOML_HOME/tuneserve/api-keys; ~/bentoml/tuneserve/api-keys.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

KEYS_FILE_NAME = "api-keys"
DEFAULT_KEY_NAME = "default"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class KeyFileError(ValueError):
    """A key file or TUNESERVE_API_KEYS value that cannot be parsed."""


def service_home(env: Mapping[str, str]) -> Path:
    """The service home: $TUNESERVE_HOME, else $BENTOML_HOME/tuneserve (BentoML's default ~/bentoml)."""
    if env.get("TUNESERVE_HOME", "").strip():
        return Path(env["TUNESERVE_HOME"]).expanduser().resolve()
    bentoml_home = Path(env.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()
    return (bentoml_home / "tuneserve").resolve()


def keys_file_path(env: Mapping[str, str]) -> Path:
    configured = env.get("TUNESERVE_API_KEYS_FILE", "").strip()
    return Path(configured).expanduser().resolve() if configured else service_home(env) / KEYS_FILE_NAME


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


def client_key(server_url: str, env: Mapping[str, str] | None = None) -> str | None:
    """The key a client sends: $TUNESERVE_API_KEY; else, for a server on this machine, the key
    file's `default` key (else its first); else None. The local key file is never sent to another
    machine. An unreadable file counts as absent (the server then answers 401 saying what to send)."""
    env = os.environ if env is None else env
    if env.get("TUNESERVE_API_KEY", "").strip():
        return env["TUNESERVE_API_KEY"].strip()
    if not is_local(server_url):
        return None
    try:
        keys = parse_keys(keys_file_path(env).read_text(), "key file")
    except (OSError, KeyFileError):
        return None
    return keys.get(DEFAULT_KEY_NAME) or next(iter(keys.values()), None)
