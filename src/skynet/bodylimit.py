"""A cap on HTTP request bodies, enforced before they are read (pure ASGI middleware).

A body whose Content-Length is over the cap is refused before a byte of it is read; a chunked one
as soon as what arrived passes the cap. Nothing behind this middleware (JSON parsing,
tokenization) ever sees more than `limit` bytes. The refusal closes the connection, so the server
does not go on reading (and discarding) the rest of the body.
"""
from __future__ import annotations

from starlette.exceptions import HTTPException


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes", headers={"Connection": "close"})


class BodyLimit:
    def __init__(self, app, limit: int, refuse):
        """refuse(exc: HTTPException) -> an ASGI response in the API's error shape."""
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            return await self.refuse(BodyTooLarge(self.limit))(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:   # the route's body read fails: the API's handler answers 413
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
