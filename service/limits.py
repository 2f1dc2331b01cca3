"""Request limits: `BodyLimitMiddleware` (body size) and `inside_root` (data paths stay in the data root).

The middleware refuses request bodies over the limit with 413, before the app reads them. A declared `Content-Length` over the limit is answered at once, without reading the body. A body
streamed without one (chunked) is counted as it is read; once it passes the limit, reading stops
and whatever the app would have answered is replaced by the 413.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Awaitable, Callable

from models.errors import TuneserveError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class DataPathRefused(TuneserveError):
    """A `data_path` outside the data root (403) or missing (404)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def inside_root(root: Path, relative: str) -> Path:
    """`relative` resolved inside `root` (symlinks followed), or DataPathRefused 403 / 404."""
    root = root.resolve()
    candidate = (root / relative).resolve()  # an absolute `relative` replaces root, then fails the check
    if not candidate.is_relative_to(root):
        raise DataPathRefused(f"data_path {relative!r} resolves outside the data root", 403)
    if not candidate.exists():
        raise DataPathRefused(f"data_path {relative!r} does not exist under the data root", 404)
    return candidate


def _message(limit: int, size: int | None, variable: str) -> bytes:
    mb = limit / (1024 * 1024)
    told = f"request body is {size} bytes; " if size is not None else "request body is larger than allowed; "
    return json.dumps({"error": f"{told}limit is {limit} bytes ({mb:g} MB, {variable})"}).encode()


async def json_error(send: Send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer `{"error": message}` with `status` from ASGI middleware, before the app reads anything;
    the connection closes (the body, if any, is not read)."""
    await _send_json(send, status, json.dumps({"error": message}).encode(), headers)


async def _send_json(send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def _send_413(send: Send, limit: int, size: int | None, variable: str) -> None:
    await _send_json(send, 413, _message(limit, size, variable))


class BodyLimitMiddleware:
    """`max_bytes` for every route; `overrides` maps a path prefix (e.g. "/finetune") to its own limit."""

    default_variable = "TUNESERVE_MAX_BODY_MB"
    override_variable = "TUNESERVE_FINETUNE_MAX_UPLOAD_MB"

    def __init__(self, app, max_bytes: int, overrides: dict[str, int] | None = None):
        self.app = app
        self.default_max = int(max_bytes)
        self.overrides = sorted((overrides or {}).items(), key=lambda kv: -len(kv[0]))

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.overrides:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return int(limit)
        return self.default_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limit_for(scope.get("path", ""))
        variable = self.default_variable if max_bytes == self.default_max else self.override_variable
        declared = None
        for key, value in scope.get("headers") or []:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break
        if declared is not None and declared > max_bytes:
            await _send_413(send, max_bytes, declared, variable)
            return

        state = {"received": 0, "exceeded": False, "started": False, "replaced": False}

        async def limited_receive() -> Message:
            if state["exceeded"]:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > max_bytes:
                    state["exceeded"] = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if state["replaced"]:
                return
            if state["exceeded"] and not state["started"]:
                state["replaced"] = True
                await _send_413(send, max_bytes, None, variable)
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not state["started"] and not state["replaced"]:
                await _send_413(send, max_bytes, None, variable)
        except Exception:
            if state["exceeded"] and not state["started"] and not state["replaced"]:
                await _send_413(send, max_bytes, None, variable)
            else:
                raise
