"""The omni HTTP server: one FastAPI app on uvicorn in front of an ``AsyncOmniLLM``.

Endpoints: ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (OpenAI Images API; edits:
image-to-image from a multipart form), ``POST /generate`` (native, any pipeline), ``GET /health``,
``GET /info``, ``GET /v1/models``. Every error uses OpenAI's schema
``{"error": {"message", "type", "param", "code"}}``; ``--api-key`` guards every endpoint but ``/health``;
at most ``--max-queued-requests`` generation requests are held at once (more: 429 with ``Retry-After``).
A client that goes away aborts its request in every stage. ``GET /metrics``: Prometheus text (requests,
every stage, vLLM's own metrics of ar stages; ``metrics.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from vllm.exceptions import VLLMError

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.entrypoints.async_omni_llm import AsyncOmniLLM
from vllm_omni.entrypoints.openai.body_limit import BodyLimitMiddleware
from vllm_omni.entrypoints.openai.generate import (
    GenerateRequest,
    generate_events,
    generate_response,
    stage_params,
)
from vllm_omni.entrypoints.openai.image_edits import read_image_edit, refuses_image
from vllm_omni.entrypoints.openai.images import (
    ImageGenerationRequest,
    ImageRequestError,
    image_event,
    images_response,
    parse_size,
)
from vllm_omni.entrypoints.openai.metrics import add_request_metrics, metrics_response
from vllm_omni.entrypoints.openai.text_serving import attach_text_serving, serves_text
from vllm_omni.pipeline.running_stages import OmniStageError
from vllm_omni.pipeline.stage_manager import OmniQueueFullError
from vllm_omni.version import __version__

DISCONNECT_POLL_SECONDS = 0.1
RETRY_AFTER_SECONDS = 1
DRAIN_TIMEOUT_SECONDS = 60


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


def build_app(server: OmniServer, args: argparse.Namespace | None = None) -> FastAPI:
    """The app serving ``server``'s pipeline; with vLLM's chat and completion routes where the pipeline
    ``serves_text`` (set up from the command line's ``args``)."""
    # The key is checked by a dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware hides a
    # client's disconnect from the route, which must abort the request.
    app = FastAPI(title="vLLM-Omni", version=__version__, dependencies=[Depends(_check_api_key)])
    app.state.server = server
    app.add_middleware(BodyLimitMiddleware)  # 413 before an oversized body is read
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    for error_type in (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError):
        app.add_exception_handler(error_type, _vllm_error)  # raised by vLLM's routes
    _add_routes(app)
    if serves_text(server.omni.stages):
        attach_text_serving(app, server, args or argparse.Namespace())
    add_request_metrics(app)  # after every route: it counts the generation endpoints the app serves
    return app


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        dead = _server(request).omni.manager.dead
        if dead is not None:
            return _error_response(503, str(dead), None, "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return await metrics_response(_server(request).omni, request.app.state.metrics)

    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        server = _server(request)
        stats = await asyncio.gather(*(server.omni.stage_stats(s.stage_id) for s in server.omni.stages))
        return _info(server, stats)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        name = _server(request).model_name
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "owned_by": "vllm-omni", "root": name}],
        }

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request) -> Any:
        server = _server(request)
        prompt, params = _image_request(server, body)
        if body.stream:
            return await _event_stream(request, prompt, params[0], _image_events(body))
        results = await server.run(request, asyncio.gather(*(server.generate(prompt, p) for p in params)))
        return images_response(body, results)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> Any:
        server = _server(request)
        try:
            edit = await read_image_edit(request, server.omni.stages, server.omni.manager.running.limits)
        except ImageRequestError as error:
            raise ServerError(400, str(error), error.param) from None
        prompt, params = edit.pipeline_request(*_image_request(server, edit.body))
        try:
            work = asyncio.gather(*(server.generate(prompt, p) for p in params))
            return images_response(edit.body, await server.run(request, work))
        except ServerError as error:  # a dit stage that takes no init image refuses it when it is added
            if error.param is None and refuses_image(str(error)):
                raise ServerError(400, str(error), "image") from None
            raise

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Any:
        server = _server(request)
        try:
            params = stage_params(server.omni.stages, body.params)
        except ValueError as error:
            raise ServerError(400, str(error), "params") from None
        if body.stream:
            return await _event_stream(request, body.prompt, params, _generate_events)
        result = await server.run(request, server.generate(body.prompt, params))
        return generate_response(server.omni.stages, result)


def _image_request(
    server: OmniServer, body: ImageGenerationRequest
) -> tuple[dict[str, str], list[list[Any]]]:
    """The pipeline prompt and each image's stage params of a checked images request."""
    stages = server.omni.stages
    if stages[-1].engine_type != "dit":
        raise ServerError(400, "this pipeline does not end in a 'dit' stage: it makes no images", "model")
    try:
        body.check_served()
    except ImageRequestError as error:
        raise ServerError(400, str(error), error.param) from None
    if body.negative_prompt is not None and stages[0].engine_type != "dit":
        raise ServerError(400, "negative_prompt needs a pipeline whose first stage is its dit stage",
                          "negative_prompt")  # fmt: skip
    _check_size(server, body)
    prompt = {"prompt": body.prompt}
    if body.negative_prompt is not None:
        prompt["negative_prompt"] = body.negative_prompt
    return prompt, [_image_params(stages, body, i) for i in range(body.n)]


async def _event_stream(
    request: Request, prompt: Any, params: list[Any], events: Callable[[OmniServer, AsyncIterator[Any]], Any]
) -> StreamingResponse:
    """Server-sent ``events`` of one request's snapshots. Errors before the first snapshot are plain HTTP
    errors; a client that goes away cancels the stream, which aborts the request in every stage."""
    server = _server(request)
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


def _image_events(body: ImageGenerationRequest) -> Callable[[OmniServer, AsyncIterator[Any]], Any]:
    """OpenAI's image events: ``image_generation.partial_image`` per preview, then ``...completed``."""

    async def events(server: OmniServer, outputs: AsyncIterator[Any]) -> AsyncIterator[str]:
        last = len(server.omni.stages) - 1
        async for output in outputs:
            if output.finished:
                if output.error is not None:
                    yield _error_event(server, output)
                else:
                    yield _sse("image_generation.completed", image_event(body, output.images[0], None))
                return
            stage_output = output.stage_outputs.get(last) if output.stage_id == last else None
            index = getattr(stage_output, "partial_image_index", None)
            if index is not None:
                yield _sse("image_generation.partial_image", image_event(body, stage_output.images[0], index))

    return events


async def _generate_events(server: OmniServer, outputs: AsyncIterator[Any]) -> AsyncIterator[str]:
    """``/generate``'s events (see ``generate.py``)."""
    async for event, data in generate_events(server.omni.stages, outputs):
        if event != "done":
            yield _sse(event, data)
        elif data.error is not None:
            yield _error_event(server, data)
        else:
            yield _sse("done", generate_response(server.omni.stages, data))


def _error_event(server: OmniServer, output: Any) -> str:
    failure = ServerError(400, output.error) if output.refused else server.failure(output.error)
    error = {"message": str(failure), "type": failure.kind, "param": None, "code": failure.status}
    return _sse("error", {"error": error})


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _check_size(server: OmniServer, body: ImageGenerationRequest) -> None:
    """The size asked for against every DiT stage's limits (a 400 naming ``size``)."""
    if body.size == "auto":
        return
    width, height = parse_size(body.size)
    for stage, limits in zip(server.omni.stages, server.omni.manager.running.limits, strict=True):
        if stage.engine_type == "dit":
            try:
                limits.check_size(height, width)
            except ValueError as error:
                raise ServerError(400, f"{stage.label}: {error}", "size") from None


def _image_params(stages: list[OmniStageConfig], body: ImageGenerationRequest, index: int) -> list[Any]:
    """Every stage's params for image ``index``: the DiT stages get the request's, the others defaults."""
    params = []
    for stage in stages:
        full_steps = stage.dit_config.num_inference_steps if stage.dit_config is not None else None
        dit_params = body.dit_params(index, full_steps) if stage.engine_type == "dit" else None
        if stage is stages[-1] and body.partial_images:  # the final image's previews
            dit_params["partial_images"] = body.partial_images
        params.append(dit_params)
    return params


def _info(server: OmniServer, stats: list[dict[str, int]]) -> dict[str, Any]:
    import vllm

    stages = []
    limits = server.omni.manager.running.limits
    for stage, stage_limits, stage_stats in zip(server.omni.stages, limits, stats, strict=True):
        entry = {"stage_id": stage.stage_id, "kind": stage.engine_type, "model": stage.model_path,
                 "final_output": stage.final_output, "limits": _as_json(stage_limits),
                 "stats": stage_stats}  # fmt: skip
        if stage.dit_config is not None:
            entry["executor"] = "diffusers" if stage.dit_config.use_diffusers else "native"
        stages.append(entry)
    return {
        "model": server.model_name,
        "stages": stages,
        "max_queued_requests": server.max_queued_requests,
        "versions": {"vllm_omni": __version__, "vllm": vllm.__version__},
    }


def _as_json(limits: Any) -> Any:
    return dataclasses.asdict(limits) if dataclasses.is_dataclass(limits) else limits


def _server(request: Request) -> OmniServer:
    return request.app.state.server


async def _check_api_key(request: Request) -> None:
    key = _server(request).api_key
    if key is not None and request.url.path != "/health":
        if request.headers.get("authorization") != f"Bearer {key}":
            message = "missing or wrong API key (Authorization: Bearer KEY)"
            raise ServerError(401, message, kind="authentication_error")


async def _server_error(request: Request, error: ServerError) -> JSONResponse:
    response = _error_response(error.status, str(error), error.param, error.kind)
    if error.status == 429:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


async def _vllm_error(request: Request, error: Exception) -> JSONResponse:
    """An exception out of vLLM's routes, as vLLM's server answers it (status, type, param)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    info = create_error_response(error).error
    return _error_response(info.code, info.message, info.param, info.type)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (no such path 404, wrong method 405, unreadable body 400) in OpenAI's schema."""
    response = _error_response(error.status_code, str(error.detail), None, "invalid_request_error")
    response.headers.update(error.headers or {})
    return response


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return _error_response(400, message, param, "invalid_request_error")


def _error_response(status: int, message: str, param: str | None, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def run_server(args: argparse.Namespace, stages: list[OmniStageConfig]) -> None:
    """Start the pipeline (exit code 1 naming the stage that cannot start), then serve until SIGINT/SIGTERM:
    stop accepting, finish what is in flight (up to DRAIN_TIMEOUT_SECONDS), stop every stage."""
    import uvicorn

    try:
        omni = AsyncOmniLLM(stages)
    except OmniStageError as error:
        sys.exit(f"vllm serve --omni: {error}")
    name = args.served_model_name or [args.model_tag or stages[-1].model_path]
    name = name[0] if isinstance(name, list) else name
    server = OmniServer(omni, name, args.api_key, args.max_queued_requests)
    # uvicorn drains on SIGINT/SIGTERM, then raises the signal again with the handlers it found: these
    # let the pipeline stop below and the process exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        uvicorn.run(build_app(server, args), host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=DRAIN_TIMEOUT_SECONDS)  # fmt: skip
    finally:
        omni.shutdown()
