"""OpenAI Images API (``POST /v1/images/generations``) over an omni pipeline that ends in a ``dit`` stage.

The request model validates every field (an unknown field, a bad type or value is a 400 naming it); a
request becomes one pipeline request per image (``n``), each DiT stage getting the size, steps, guidance
and seed; the response carries base64 images and, when an ``ar`` stage rewrote the prompt, its text as
``revised_prompt``.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

QUALITY_STEPS = {"low": 0.25, "medium": 0.5, "high": 1.0}
"""``quality`` as a share of the DiT stage's full step count (``auto``: the stage's own default)."""
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class ImageRequestError(ValueError):
    """A request the server refuses (HTTP 400); ``param`` names the field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class ImageGenerationRequest(BaseModel):
    """The body of ``POST /v1/images/generations`` (OpenAI's fields, then this server's extensions)."""

    model_config = ConfigDict(extra="forbid")
    event_kind: ClassVar[str] = "image_generation"
    """The streamed events' ``type`` prefix: ``<event_kind>.partial_image``, ``<event_kind>.completed``."""

    prompt: str = Field(min_length=1, max_length=32_000)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str = "auto"
    """``WIDTHxHEIGHT`` or ``auto`` (the stage's default size)."""
    quality: Literal["low", "medium", "high", "auto"] = "auto"
    """A share of the stage's steps: low 1/4, medium 1/2, high all, auto the stage's default."""
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["opaque", "auto", "transparent"] = "auto"
    user: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    """Send server-sent events: ``partial_image`` previews, then the ``completed`` image (one image: ``n``
    must be 1, as the events carry no image index)."""
    partial_images: int = Field(0, ge=0, le=3)
    """Previews to stream while the image denoises (with ``stream``)."""

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        if value != "auto":
            parse_size(value)
        return value

    def check_served(self) -> None:
        """Refuse what this server does not do (valid in OpenAI's API, not served here)."""
        if self.response_format == "url":
            raise ImageRequestError(
                "response_format", "only 'b64_json' is served: this server keeps no files"
            )
        if self.background == "transparent":
            raise ImageRequestError(
                "background", "transparent backgrounds are not served; use 'opaque' or 'auto'"
            )
        if self.stream and self.n != 1:
            raise ImageRequestError("n", "a streamed request makes one image (n=1)")
        if self.partial_images and not self.stream:
            raise ImageRequestError("partial_images", "partial images are streamed: set stream to true")
        if self.output_compression is not None and self.output_format == "png":
            raise ImageRequestError("output_compression", "output_compression is for 'jpeg' and 'webp'")

    def dit_params(self, index: int, full_steps: int | None) -> dict[str, Any]:
        """The DiT stages' params of image ``index`` (its seed is ``seed + index``)."""
        width, height = parse_size(self.size) if self.size != "auto" else (None, None)
        steps = self.num_inference_steps
        if steps is None and self.quality in QUALITY_STEPS and full_steps is not None:
            steps = max(1, round(full_steps * QUALITY_STEPS[self.quality]))
        seed = None if self.seed is None else self.seed + index
        params = {"width": width, "height": height, "num_inference_steps": steps,
                  "guidance_scale": self.guidance_scale, "seed": seed}  # fmt: skip
        return {key: value for key, value in params.items() if value is not None}


def parse_size(text: str) -> tuple[int, int]:
    """``(width, height)`` of ``WIDTHxHEIGHT``."""
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) < 1 or int(height) < 1:
        raise ValueError(f"size must be 'auto' or WIDTHxHEIGHT like '1024x1024', got {text!r}")
    return int(width), int(height)


def encode_image(image: Any, output_format: str, compression: int | None) -> str:
    """A PIL image as base64 in ``output_format`` (``compression``: 0-100 quality for jpeg/webp)."""
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image = image.convert("RGB")
    options = {} if compression is None else {"quality": compression}
    image.save(buffer, format=IMAGE_FORMATS[output_format], **options)
    return base64.b64encode(buffer.getvalue()).decode()


def image_event(
    request: ImageGenerationRequest, image: Any, partial_image_index: int | None
) -> dict[str, Any]:
    """A ``<event_kind>.partial_image`` event of ``request`` (``partial_image_index`` set) or its
    ``<event_kind>.completed`` one (``image_generation.*``, ``image_edit.*``)."""
    width, height = image.size
    event = {
        "type": f"{request.event_kind}.{'completed' if partial_image_index is None else 'partial_image'}",
        "b64_json": encode_image(image, request.output_format, request.output_compression),
        "created_at": int(time.time()),
        "size": f"{width}x{height}",
        "quality": request.quality,
        "background": "opaque",
        "output_format": request.output_format,
    }
    if partial_image_index is None:
        event["usage"] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                          "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}  # fmt: skip
    else:
        event["partial_image_index"] = partial_image_index
    return event


def images_response(request: ImageGenerationRequest, results: list[Any]) -> dict[str, Any]:
    """OpenAI's ``ImagesResponse`` for the finished pipeline requests (one per image)."""
    data = []
    for result in results:
        item = {"b64_json": encode_image(result.images[0], request.output_format, request.output_compression)}
        if result.text is not None:
            item["revised_prompt"] = result.text
        data.append(item)
    width, height = results[0].images[0].size
    return {
        "created": int(time.time()),
        "data": data,
        "size": f"{width}x{height}",
        "quality": request.quality,
        "background": "opaque",
        "output_format": request.output_format,
    }
