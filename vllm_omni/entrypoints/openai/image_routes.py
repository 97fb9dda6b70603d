"""The OpenAI Images API routes: ``POST /v1/images/generations`` and ``POST /v1/images/edits``.

Both make one pipeline request per image (``images.py``: the request model, each image's DiT params, the
response); edits read a multipart form and put the init image in the prompt (``image_edits.py``). With
``stream`` both answer through the server's one event-stream path (``omni_server.event_stream``):
``<kind>.partial_image`` events per preview of the final dit stage, then ``<kind>.completed``, where
``<kind>`` is ``image_generation`` or ``image_edit`` as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.entrypoints.openai.image_edits import read_image_edit, refuses_image
from vllm_omni.entrypoints.openai.images import (
    ImageGenerationRequest,
    ImageRequestError,
    image_event,
    images_response,
    parse_size,
)
from vllm_omni.entrypoints.openai.omni_server import (
    EventSource,
    OmniServer,
    ServerError,
    error_event,
    event_stream,
    server_of,
    sse,
)

router = APIRouter()


@router.post("/v1/images/generations")
async def images_generations(body: ImageGenerationRequest, request: Request) -> Any:
    """Images from a text prompt (OpenAI's ``images.generate``)."""
    prompt, params = _image_request(server_of(request), body)
    return await _serve_images(request, body, prompt, params)


@router.post("/v1/images/edits")
async def images_edits(request: Request) -> Any:
    """Images from an init image and a prompt (OpenAI's ``images.edit``; a multipart form)."""
    server = server_of(request)
    try:
        edit = await read_image_edit(request, server.omni.stages, server.omni.manager.running.limits)
    except ImageRequestError as error:
        raise ServerError(400, str(error), error.param) from None
    prompt, params = edit.pipeline_request(*_image_request(server, edit.body))
    try:
        return await _serve_images(request, edit.body, prompt, params)
    except ServerError as error:  # a dit stage that takes no init image refuses it when it is added
        if error.param is None and refuses_image(str(error)):
            raise ServerError(400, str(error), "image") from None
        raise


async def _serve_images(
    request: Request, body: ImageGenerationRequest, prompt: dict[str, Any], params: list[list[Any]]
) -> Any:
    """The images response of a checked request, or its event stream (``stream``: one image)."""
    if body.stream:
        return await event_stream(request, prompt, params[0], _image_events(body))
    server = server_of(request)
    results = await server.run(request, asyncio.gather(*(server.generate(prompt, p) for p in params)))
    return images_response(body, results)


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


def _image_events(body: ImageGenerationRequest) -> EventSource:
    """OpenAI's image events: a ``partial_image`` event per preview, then the ``completed`` one."""

    async def events(server: OmniServer, outputs: AsyncIterator[Any]) -> AsyncIterator[str]:
        last = len(server.omni.stages) - 1
        async for output in outputs:
            if output.finished:
                if output.error is not None:
                    yield error_event(server, output)
                else:
                    yield _image_sse(image_event(body, output.images[0], None))
                return
            stage_output = output.stage_outputs.get(last) if output.stage_id == last else None
            index = getattr(stage_output, "partial_image_index", None)
            if index is not None:
                yield _image_sse(image_event(body, stage_output.images[0], index))

    return events


def _image_sse(event: dict[str, Any]) -> str:
    return sse(event["type"], event)


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
