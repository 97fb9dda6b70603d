"""What every route of the omni server serves through: ``OmniServer`` (the pipeline, admission),
``ServerError`` (an error response), ``watch`` (a client that goes away aborts its request) and
``event_stream`` (server-sent events of one request's snapshots, for images and ``/generate``).

The app (``api_server.py``) and the route modules it mounts (``image_routes.py``) import from here: a route
module never imports the app, as vLLM's routers import its shared serving pieces, never its ``api_server``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from vllm_omni.entrypoints.async_omni_llm import AsyncOmniLLM
from vllm_omni.pipeline.running_stages import OmniStageError
from vllm_omni.pipeline.stage_manager import OmniQueueFullError

DISCONNECT_POLL_SECONDS = 0.1


class ServerError(Exception):
    """An error response: HTTP ``status``, OpenAI error ``type``, the ``param`` at fault."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


@dataclasses.dataclass
class OmniServer:
    """What the routes share."""

    omni: AsyncOmniLLM
    model_name: str
    api_key: str | None
    max_queued_requests: int
    held: int = 0
    """Generation requests being served now."""

    async def run(self, request: Request, work: Awaitable[Any]) -> Any:
        """Serve ``work`` under admission (``admit``) while the client is there (``watch``). Refused work
        never runs (``asyncio.gather`` schedules its requests at once: cancelled before they start)."""
        try:
            self.admit()
        except ServerError:
            asyncio.ensure_future(work).cancel()
            raise
        try:
            return await watch(request, work)
        finally:
            self.held -= 1

    async def generate(self, prompt: Any, params: list[Any]) -> Any:
        """One request through the pipeline; its finished result (pipeline errors as ``ServerError``)."""
        async for output in self.stream(prompt, params):
            result = output
        if result.refused:
            raise ServerError(400, result.error)
        if result.error is not None:
            raise self.failure(result.error)
        return result

    async def stream(self, prompt: Any, params: list[Any]) -> AsyncIterator[Any]:
        """The request's snapshots; errors before it runs as ``ServerError`` (400, 429, 503)."""
        try:
            first = True
            async for output in self.omni.generate(prompt, params):
                if first and output.refused:  # the first stage refused the prompt
                    raise ServerError(400, output.error)
                first = False
                yield output
        except ValueError as error:
            raise ServerError(400, str(error)) from None
        except OmniQueueFullError as error:
            raise ServerError(429, str(error), kind="rate_limit_exceeded") from None
        except OmniStageError as error:
            raise ServerError(503, str(error), kind="server_error") from None

    def failure(self, error: str) -> ServerError:
        """A request that failed in a stage: 500, or 503 once a stage is gone (the pipeline is done)."""
        return ServerError(503 if self.omni.manager.dead else 500, error, kind="server_error")

    def admit(self) -> None:
        """Hold one more request, or refuse it (429) when ``max_queued_requests`` are held."""
        self.check_room()
        self.held += 1

    def check_room(self) -> None:
        """Refuse (429) a request while ``max_queued_requests`` are held."""
        if self.held >= self.max_queued_requests:
            message = f"the server holds {self.held} requests (--max-queued-requests); retry later"
            raise ServerError(429, message, kind="rate_limit_exceeded")


def server_of(request: Request) -> OmniServer:
    """The ``OmniServer`` of the app serving ``request``."""
    return request.app.state.server


async def watch(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; a client that goes away cancels it (which aborts its request in every stage) and is
    answered 499, nginx's "client closed request" (read by nobody; the log shows it, not a traceback)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                raise ServerError(499, "the client closed the request", kind="client_closed_request")
        return await task
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # read: not logged


EventSource = Callable[[OmniServer, AsyncIterator[Any]], AsyncIterator[str]]
"""Turns a request's snapshots into server-sent events (``sse`` strings)."""


async def event_stream(
    request: Request, prompt: Any, params: list[Any], events: EventSource
) -> StreamingResponse:
    """Server-sent ``events`` of one request's snapshots. Errors before the first snapshot are plain HTTP
    errors; a client that goes away cancels the stream, which aborts the request in every stage."""
    server = server_of(request)
    server.admit()
    try:
        snapshots = server.stream(prompt, params)
        first = await watch(request, anext(snapshots))
    except BaseException:
        server.held -= 1
        raise

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events(server, _chained(first, snapshots)):
                yield event
        finally:
            server.held -= 1
            await snapshots.aclose()

    return StreamingResponse(body(), media_type="text/event-stream")


async def _chained(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def error_event(server: OmniServer, output: Any) -> str:
    """The ``error`` event of a request that failed after its stream began (OpenAI's error schema)."""
    failure = ServerError(400, output.error) if output.refused else server.failure(output.error)
    error = {"message": str(failure), "type": failure.kind, "param": None, "code": failure.status}
    return sse("error", {"error": error})


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
