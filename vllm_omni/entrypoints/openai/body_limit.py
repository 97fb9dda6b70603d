"""A bound on the size of request bodies (413 beyond it), checked before a route reads the body.

uvicorn and Starlette take a body of any size (vLLM's server bounds only the headers, with h11's limits), and
a JSON body is read whole into memory before it is parsed. This ASGI middleware refuses a body whose
``Content-Length`` is over the limit without reading it, and a chunked body as soon as the bytes received pass
the limit; the route never sees either. It is plain ASGI, not Starlette's ``BaseHTTPMiddleware``, which would
hide a client's disconnect from the routes.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 16 * 2**20
"""Largest body but a multipart one: an images prompt is at most 32 000 characters; 16 MiB leaves room for
long token-id prompts and base64 images inside chat messages."""
MAX_FORM_BODY_BYTES = 64 * 2**20
"""Largest multipart body (image edits: one image of up to 50 MiB, and the form fields)."""


class BodyTooLarge(Exception):
    """Raised to the route reading a body that has passed the limit (the middleware answers 413)."""


class BodyLimitMiddleware:
    """Answers 413, in the OpenAI error schema, to a request whose body is over its limit."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_form_body_bytes: int = MAX_FORM_BODY_BYTES,
    ) -> None:
        self.app = app
        self.max_body_bytes, self.max_form_body_bytes = max_body_bytes, max_form_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        multipart = headers.get("content-type", "").startswith("multipart/")
        limit = self.max_form_body_bytes if multipart else self.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await _refuse(scope, receive, send, limit)  # before a byte of the body is read
            return
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise BodyTooLarge(f"the request body is over {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:  # what the app answers to its failed read: the 413 goes out instead
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            await _refuse(scope, receive, send, limit)


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    message = f"the request body is over the server's limit of {limit} bytes ({limit / 2**20:g} MiB)"
    error: dict[str, Any] = {"message": message, "type": "invalid_request_error", "param": None, "code": 413}
    # The rest of the body is never read: close the connection rather than parse it as the next request.
    response = JSONResponse({"error": error}, status_code=413, headers={"connection": "close"})
    await response(scope, receive, send)
