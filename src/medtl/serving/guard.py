"""The ASGI layer in front of every route: the Bearer token on /v1/*, the upload size limit
(checked from Content-Length, and again while the body is read, so a chunked upload cannot
pass it), security headers, and the request log (method, route, status, number of files,
bytes, milliseconds: no file names, no query strings, no DICOM tags, no pixels)."""

from __future__ import annotations

import hmac
import json
import logging
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("medtl.serve")

PROTECTED = "/v1/"
# Routes named in the log; any other path (a scanner's guess may hold anything) is not.
LOGGED = ("/v1/", "/static/", "/health", "/ready", "/docs", "/openapi.json")
FILES_KEY = "medtl_files"  # request.state attribute a route sets to the number of uploads
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
           (b"x-frame-options", b"DENY")]


async def _answer(send: Send, status: int, detail: str,
                  extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *HEADERS, *extra]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """``token``: required as ``Authorization: Bearer TOKEN`` on every /v1/ route (None: no
    token, for loopback); ``max_bytes``: the largest request body accepted (413 beyond)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_bytes: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_bytes = max_bytes

    def _authorised(self, scope: Scope) -> bool:
        if self.token is None or not scope["path"].startswith(PROTECTED):
            return True
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        return hmac.compare_digest(given, self.token)

    def too_large(self) -> str:
        return (f"upload larger than {self.max_bytes / 2**20:g} MB, the most this server "
                "accepts (--max-upload-mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, seen = time.perf_counter(), {"bytes": 0, "status": 500}
        state = scope.setdefault("state", {})

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_bytes:  # raised inside the route: a 413 answer
                    raise HTTPException(413, self.too_large())
            return message

        try:
            if not self._authorised(scope):
                await _answer(sending, 401, "missing or wrong token (Authorization: Bearer)",
                              [(b"www-authenticate", b"Bearer")])
            elif self._declared(scope) > self.max_bytes:
                await _answer(sending, 413, self.too_large())
            else:
                await self.app(scope, receiving, sending)
        finally:
            path = scope["path"]
            shown = path if path == "/" or path.startswith(LOGGED) else "(other path)"
            log.info("%s %s %d files=%s bytes=%d %.0f ms", scope["method"], shown[:100],
                     seen["status"], state.get(FILES_KEY, 0), seen["bytes"],
                     (time.perf_counter() - start) * 1000)

    @staticmethod
    def _declared(scope: Scope) -> int:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0
