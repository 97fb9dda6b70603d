"""The omni HTTP server: one FastAPI app on uvicorn in front of an ``AsyncOmniLLM``.

Endpoints: ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (OpenAI Images API, their routes
in ``image_routes.py``), ``POST /generate`` (native, any pipeline), ``GET /health``, ``GET /info``,
``GET /v1/models``; what the routes share (admission, disconnects, the event stream) is
``omni_server.py``. Every error uses OpenAI's schema
``{"error": {"message", "type", "param", "code"}}``; ``--api-key`` guards every endpoint but ``/health``;
at most ``--max-queued-requests`` generation requests are held at once (more: 429 with ``Retry-After``).
A client that goes away aborts its request in every stage. ``GET /metrics``: Prometheus text (requests,
every stage, vLLM's own metrics of ar stages; ``metrics.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
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
from vllm_omni.entrypoints.openai.image_routes import router as image_router
from vllm_omni.entrypoints.openai.metrics import add_request_metrics, metrics_response
from vllm_omni.entrypoints.openai.omni_server import (
    OmniServer,
    ServerError,
    error_event,
    event_stream,
    server_of,
    sse,
)
from vllm_omni.entrypoints.openai.text_serving import attach_text_serving, serves_text
from vllm_omni.pipeline.running_stages import OmniStageError
from vllm_omni.version import __version__

RETRY_AFTER_SECONDS = 1
DRAIN_TIMEOUT_SECONDS = 60


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
    app.include_router(image_router)
    if serves_text(server.omni.stages):
        attach_text_serving(app, server, args or argparse.Namespace())
    add_request_metrics(app)  # after every route: it counts the generation endpoints the app serves
    return app


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        manager = server_of(request).omni.manager
        if manager.dead is not None:
            return _error_response(503, str(manager.dead), None, "server_error")
        if manager.dead_replicas:  # still serving, on the replicas left
            ended = [str(error) for error in manager.dead_replicas.values()]
            return JSONResponse({"status": "degraded", "dead_replicas": ended})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return await metrics_response(server_of(request).omni, request.app.state.metrics)

    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        server = server_of(request)
        stats = await asyncio.gather(*(server.omni.stage_stats(s.stage_id) for s in server.omni.stages))
        return _info(server, stats)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        name = server_of(request).model_name
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "owned_by": "vllm-omni", "root": name}],
        }

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Any:
        server = server_of(request)
        try:
            params = stage_params(server.omni.stages, body.params)
        except ValueError as error:
            raise ServerError(400, str(error), "params") from None
        if body.stream:
            return await event_stream(request, body.prompt, params, _generate_events)
        result = await server.run(request, server.generate(body.prompt, params))
        return generate_response(server.omni.stages, result)


async def _generate_events(server: OmniServer, outputs: AsyncIterator[Any]) -> AsyncIterator[str]:
    """``/generate``'s events (see ``generate.py``)."""
    async for event, data in generate_events(server.omni.stages, outputs):
        if event != "done":
            yield sse(event, data)
        elif data.error is not None:
            yield error_event(server, data)
        else:
            yield sse("done", generate_response(server.omni.stages, data))


def _info(server: OmniServer, stats: list[dict[str, int]]) -> dict[str, Any]:
    import vllm

    stages = []
    limits = server.omni.manager.running.limits
    for stage, stage_limits, stage_stats in zip(server.omni.stages, limits, stats, strict=True):
        entry = {"stage_id": stage.stage_id, "kind": stage.engine_type, "model": stage.model_path,
                 "final_output": stage.final_output, "replicas": stage.replicas,
                 "limits": _as_json(stage_limits), "stats": stage_stats}  # fmt: skip
        if stage.dit_config is not None:
            entry["executor"] = stage_stats["executor"]  # what runs, as the stage reports it
        stages.append(entry)
    return {
        "model": server.model_name,
        "stages": stages,
        "max_queued_requests": server.max_queued_requests,
        "versions": {"vllm_omni": __version__, "vllm": vllm.__version__},
    }


def _as_json(limits: Any) -> Any:
    return dataclasses.asdict(limits) if dataclasses.is_dataclass(limits) else limits


async def _check_api_key(request: Request) -> None:
    key = server_of(request).api_key
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


def run_server(args: argparse.Namespace, stages: list[OmniStageConfig], launcher: Any = None) -> None:
    """Start the pipeline (``launcher``: see ``StageManager``; exit code 1 naming the stage that cannot
    start), then serve until SIGINT/SIGTERM: stop accepting, finish what is in flight (up to
    DRAIN_TIMEOUT_SECONDS), stop every stage."""
    import uvicorn

    try:
        omni = AsyncOmniLLM(stages, launcher=launcher)
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
        uvicorn.run(build_app(server, args), host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    access_log=not args.disable_uvicorn_access_log,
                    timeout_graceful_shutdown=DRAIN_TIMEOUT_SECONDS)  # fmt: skip
    finally:
        omni.shutdown()
