"""API keys: on by default, named, revocable without a restart. One FastAPI dependency per kind of route.

Keys come from TUNESERVE_API_KEY (named "default"), TUNESERVE_API_KEYS ("name:key,...") and the key
file (models/serving/api_keys.py: `name: key` lines, default $TUNESERVE_HOME/api-keys). When none of them
holds a key at start, one random key is written to the key file (mode 0600) and the log says where,
never the key itself. The file is re-read whenever it changes, so deleting a line revokes that key.
TUNESERVE_AUTH=off opens every route and logs a warning at every start.

    router.post("/finetune", dependencies=[Depends(require_api_key(settings))])

The dependency returns the caller's key name (also `request.state.api_key_name`); jobs record it
and quotas count per name. With auth off every caller is "anonymous".
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from models.serving.api_keys import DEFAULT_KEY_NAME, KEYS_FILE_NAME, KeyFileError, format_keys, parse_keys

log = logging.getLogger("tuneserve.auth")
CHALLENGE = {"WWW-Authenticate": "Bearer"}
# Declares the Bearer scheme in OpenAPI (Swagger's "Authorize" button); the dependencies read the header themselves.
BEARER = HTTPBearer(auto_error=False, description="An API key (see docs/security.md) as a Bearer token")
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool
    keys_file: Path
    static_keys: tuple[tuple[str, str], ...] = ()  # from the environment: fixed until restart
    protect_reads: bool = False

    @classmethod
    def of(cls, settings: Any) -> "AuthConfig":
        """From the service `Settings`."""
        static = tuple(getattr(settings, "api_keys", ()) or ())
        if getattr(settings, "api_key", None):
            static = ((DEFAULT_KEY_NAME, settings.api_key), *static)
        keys_file = getattr(settings, "api_keys_file", None) or Path(settings.home) / KEYS_FILE_NAME
        return cls(bool(getattr(settings, "auth", True)), Path(keys_file), static, bool(settings.protect_reads))


class KeyRing:
    """The valid keys: the static ones plus the key file's, re-read when the file changes."""

    def __init__(self, config: AuthConfig):
        self.config = config
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._file_keys: dict[str, str] = {}
        if not config.enabled:
            log.warning("TUNESERVE_AUTH=off: every route is open to anyone who can reach this server")
        elif not config.static_keys and not config.keys_file.exists():
            create_key_file(config.keys_file)
        else:
            log.info("API keys: %d from the environment, key file %s", len(config.static_keys), config.keys_file)

    def _file_stamp(self) -> tuple | None:
        try:
            info = self.config.keys_file.stat()
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def keys(self) -> dict[str, str]:
        """{name: key}, re-reading the key file if it changed (a stat per call)."""
        stamp = self._file_stamp()
        with self._lock:
            if stamp != self._stamp:
                self._file_keys = self._read_file() if stamp is not None else {}
                self._stamp = stamp
            return {**self._file_keys, **dict(self.config.static_keys)}

    def _read_file(self) -> dict[str, str]:
        try:
            keys = parse_keys(self.config.keys_file.read_text(), str(self.config.keys_file))
        except (OSError, KeyFileError) as error:
            # fail closed: a half-edited file must not keep a revoked key alive
            log.error("ignoring every key in the key file until it is fixed: %s", error)
            return {}
        log.info("key file %s read: %d key(s)", self.config.keys_file, len(keys))
        return keys

    def identify(self, authorization: str | None) -> str:
        """The name of the key in `authorization`, or HTTPException(401)."""
        if not self.config.enabled:
            return ANONYMOUS
        if not authorization:
            raise HTTPException(
                401,
                "this route needs an API key: send 'Authorization: Bearer <key>' (the server's key file, "
                "see docs/security.md, holds one; clients on the server's machine read it themselves)",
                headers=CHALLENGE,
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "malformed Authorization header: expected 'Bearer <key>'", headers=CHALLENGE)
        found = None
        for name, key in self.keys().items():  # compare with every key: the time taken does not tell which matched
            if hmac.compare_digest(token.encode(), key.encode()):
                found = name
        if found is None:
            raise HTTPException(401, "invalid or revoked API key", headers=CHALLENGE)
        return found


def create_key_file(path: Path) -> None:
    """Write a new random key to `path` (mode 0600) unless another process just did; log where, not the key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(format_keys({DEFAULT_KEY_NAME: secrets.token_urlsafe(32)}))
    try:
        os.link(temporary, path)  # atomic and exclusive: two workers starting at once keep one key
        log.warning(
            "no API key was configured: created one in %s (mode 0600). Routes that change state need "
            "'Authorization: Bearer <key>'; the tuneserve CLI and client on this machine read the file.", path
        )
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)


_rings: dict[AuthConfig, KeyRing] = {}
_rings_lock = threading.Lock()


def keyring(settings: Any) -> KeyRing:
    """One KeyRing per configuration and process (so the default key is created once)."""
    config = AuthConfig.of(settings)
    with _rings_lock:
        if config not in _rings:
            _rings[config] = KeyRing(config)
        return _rings[config]


def check_api_key(settings: Any, authorization: str | None) -> str:
    """The caller's key name, or HTTPException(401)."""
    return keyring(settings).identify(authorization)


def require_api_key(settings: Any) -> Callable[[Request], str]:
    """FastAPI dependency for routes that change state; returns the key name."""
    ring = keyring(settings)

    def dependency(request: Request, _: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> str:
        request.state.api_key_name = name = ring.identify(request.headers.get("authorization"))
        return name

    dependency.key_required = ring.config.enabled  # what OpenAPI declares (service/openapi.py)
    return dependency


def require_read_access(settings: Any) -> Callable[[Request], None]:
    """FastAPI dependency for reading routes: open unless TUNESERVE_PROTECT_READS is set."""
    ring = keyring(settings)

    def dependency(request: Request, _: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> None:
        if ring.config.protect_reads:
            request.state.api_key_name = ring.identify(request.headers.get("authorization"))

    dependency.key_required = ring.config.enabled and ring.config.protect_reads  # what OpenAPI declares
    return dependency
