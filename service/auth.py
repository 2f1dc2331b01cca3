"""API key check, shared by every route that changes state (and by reading routes when configured).

`check_api_key(settings, header)` is the plain check; `require_api_key(settings)` and
`require_read_access(settings)` wrap it as FastAPI dependencies:

    router.post("/finetune", dependencies=[Depends(require_api_key(settings))])
"""
from __future__ import annotations

import hmac
from typing import Callable

from fastapi import HTTPException, Request

from service.config import Settings

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def check_api_key(settings: Settings, authorization: str | None) -> None:
    """Raise HTTPException(401) unless no key is configured or `authorization` carries it."""
    expected = settings.api_key
    if not expected:
        return
    if not authorization:
        raise HTTPException(401, "this route needs an API key: send 'Authorization: Bearer <key>'", headers=CHALLENGE)
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "malformed Authorization header: expected 'Bearer <key>'", headers=CHALLENGE)
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise HTTPException(401, "invalid API key", headers=CHALLENGE)


def require_api_key(settings: Settings) -> Callable[[Request], None]:
    """FastAPI dependency for mutating routes."""

    def dependency(request: Request) -> None:
        check_api_key(settings, request.headers.get("authorization"))

    return dependency


def require_read_access(settings: Settings) -> Callable[[Request], None]:
    """FastAPI dependency for reading routes: open unless TUNESERVE_PROTECT_READS is set."""

    def dependency(request: Request) -> None:
        if settings.protect_reads:
            check_api_key(settings, request.headers.get("authorization"))

    return dependency
