"""OpenAI Images edit API (``POST /v1/images/edits``): image-to-image and inpainting through a pipeline whose
first stage is its ``dit`` stage.

The multipart form becomes the generations request model plus ``strength`` (the same checks: an unknown
field, a bad type or value is a 400 naming it), one init image and an optional mask, decoded here.
``size`` ``auto`` is the image's own size, rounded down to what the DiT stages take (as diffusers'
image-to-image pipelines round it). The mask follows OpenAI's rule, its fully transparent pixels (alpha 0)
mark where to edit; it becomes the stage's ``mask_image`` in diffusers' convention (white: repaint, black:
keep). The pipeline request is the generations one with the image (and mask) in the prompt and
``strength`` in the first stage's params; a stage refuses what it cannot do when the request is added.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image
from pydantic import Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.entrypoints.openai.images import ImageGenerationRequest, ImageRequestError

MAX_IMAGE_BYTES = 50 * 2**20
"""Largest image file taken (OpenAI's limit)."""
IMAGE_FIELDS = ("image", "image[]")
"""Form names of the init image: one file (``image``), or a list as the openai client sends it."""
MASK_FIELDS = ("mask", "mask[]")
"""Form names of the inpainting mask."""
FILE_FIELDS = IMAGE_FIELDS + MASK_FIELDS
_IMAGE_REFUSED = re.compile(r"stage \d+ \(dit\): (ValueError: )?image: ")


class ImageEditRequest(ImageGenerationRequest):
    """The form fields of ``POST /v1/images/edits`` but its files: those of generations plus ``strength``;
    streamed, its events are ``image_edit.partial_image`` and ``image_edit.completed``."""

    event_kind: ClassVar[str] = "image_edit"
    strength: float | None = Field(None, gt=0, le=1)
    """Share of the DiT's schedule run from the noised init image, in (0, 1] (1: all of it, the image only
    seeds the noise); None: the stage's default (0.6)."""


@dataclass
class ImageEdit:
    """A checked edit request: its fields (``size`` resolved), its init image (RGB) and its mask (``L``,
    diffusers' convention: 255 where to edit, 0 where to keep; None: edit the whole image)."""

    body: ImageEditRequest
    image: Image.Image
    mask: Image.Image | None = None

    def pipeline_request(
        self, prompt: dict[str, Any], params: list[list[Any]]
    ) -> tuple[dict[str, Any], list[list[Any]]]:
        """The generations request of ``body`` (``prompt``, each image's stage ``params``) made
        image-to-image: the init image (and ``mask_image``) in the prompt, ``strength`` in the first (dit)
        stage's params."""
        if self.body.strength is not None:
            for image_params in params:
                image_params[0]["strength"] = self.body.strength
        mask = {} if self.mask is None else {"mask_image": self.mask}
        return {**prompt, "image": self.image, **mask}, params


async def read_image_edit(request: Request, stages: list[OmniStageConfig], limits: list[Any]) -> ImageEdit:
    """The edit request of a multipart body, for a pipeline of ``stages`` with their published ``limits``
    (``ImageRequestError`` naming the field at fault)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ImageRequestError(None, f"send multipart/form-data (the image as a file), not {content_type!r}")
    try:
        async with request.form() as form:
            return await _edit_of(form, stages, limits)
    except HTTPException as error:  # how Starlette refuses a malformed multipart body
        raise ImageRequestError(None, f"malformed multipart/form-data body: {error.detail}") from None


def refuses_image(message: str) -> bool:
    """Whether a request's error is a dit stage refusing its init image (e.g. a diffusers pipeline without
    an image-to-image variant: ``stage 0 (dit): ValueError: image: ...``)."""
    return _IMAGE_REFUSED.match(message) is not None


async def _edit_of(form: FormData, stages: list[OmniStageConfig], limits: list[Any]) -> ImageEdit:
    image_file = _file_of(form, IMAGE_FIELDS, "image", required=True)
    mask_file = _file_of(form, MASK_FIELDS, "mask", required=False)
    body = _request_model(form)
    _check_pipeline(stages)
    if mask_file is not None:
        _check_inpainting(stages, limits)
    image = await _decode(image_file, "image", _open_image)
    mask = None if mask_file is None else _edit_area(await _decode(mask_file, "mask", _open_mask), image)
    if body.size == "auto":
        body = body.model_copy(update={"size": _auto_size(image, stages, limits)})
    return ImageEdit(body, image, mask)


def _file_of(form: FormData, names: tuple[str, ...], param: str, required: bool) -> UploadFile | None:
    """The one file the form gives under ``names`` (None when it gives none and ``required`` is false)."""
    files = [value for name in names for value in form.getlist(name)]
    if not files and required:
        raise ImageRequestError(param, f"{param} is required: the image to edit, as a file")
    if len(files) > 1:
        raise ImageRequestError(param, f"got {len(files)} {param}s; this model edits one image with one mask")
    if files and not isinstance(files[0], UploadFile):
        raise ImageRequestError(param, f"{param} must be a file (curl: -F {param}=@{param}.png)")
    return files[0] if files else None


def _request_model(form: FormData) -> ImageEditRequest:
    """The form's fields (all but the files) as the request model, validated as generations' JSON is."""
    fields = {}
    for name in dict.fromkeys(form.keys()):
        if name in FILE_FIELDS:
            continue
        values = form.getlist(name)
        if len(values) > 1:
            raise ImageRequestError(name, f"{name} is given {len(values)} times; give it once")
        if not isinstance(values[0], str):
            raise ImageRequestError(name, f"{name} must be a form field, not a file")
        fields[name] = values[0]
    try:
        return ImageEditRequest.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ImageRequestError(param, f"{param}: {first['msg']}" if param else first["msg"]) from None


def _check_pipeline(stages: list[OmniStageConfig]) -> None:
    """The init image goes to the first stage: it must be the dit stage (an ar stage hands its text on, not
    the image). A pipeline that makes no images is refused with the generations' error."""
    first = stages[0]
    if first.engine_type != "dit" and any(stage.engine_type == "dit" for stage in stages):
        raise ImageRequestError(
            "image",
            f"image-to-image needs a pipeline whose first stage is its dit stage; {first.label} would get "
            "the image and hands only its text on",
        )


def _check_inpainting(stages: list[OmniStageConfig], limits: list[Any]) -> None:
    """A mask goes to the first stage, the dit stage (``_check_pipeline``): it must inpaint. (A pipeline
    without a dit stage is refused later, as for generations.)"""
    if stages[0].engine_type != "dit":
        return
    try:
        limits[0].check_inpainting("mask")
    except ValueError as error:
        raise ImageRequestError("mask", f"{stages[0].label}: {error}") from None


async def _decode(upload: UploadFile, param: str, open_image: Callable[[bytes], Image.Image]) -> Image.Image:
    data = await upload.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRequestError(param, f"{param} is over {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        return await asyncio.to_thread(open_image, data)
    except ImageRequestError:
        raise
    except Exception as error:  # whatever PIL raises on bytes that are no image it can read
        name = upload.filename or "the upload"
        raise ImageRequestError(param, f"{param}: {name} is not an image file ({error})") from None


def _open_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # decodes it all: a truncated file fails here, not in the stage


def _open_mask(data: bytes) -> Image.Image:
    """The mask's alpha channel (``L``), decoded in full."""
    with Image.open(io.BytesIO(data)) as image:
        if not image.has_transparency_data:
            raise ImageRequestError(
                "mask",
                "mask has no alpha channel: send a PNG whose fully transparent pixels (alpha 0) mark where "
                "to edit, as OpenAI's edits API takes it",
            )
        return image.convert("RGBA").getchannel("A")


def _edit_area(alpha: Image.Image, image: Image.Image) -> Image.Image:
    """OpenAI's mask (alpha 0: edit) in diffusers' convention (white: repaint, black: keep), checked to
    cover the image exactly."""
    if alpha.size != image.size:
        raise ImageRequestError(
            "mask",
            f"mask is {alpha.width}x{alpha.height}, the image {image.width}x{image.height}: the mask must "
            "have the image's size",
        )
    return alpha.point(lambda value: 255 if value == 0 else 0)


def _auto_size(image: Image.Image, stages: list[OmniStageConfig], limits: list[Any]) -> str:
    """``size`` ``auto``: the image's size rounded down to a multiple of every dit stage's ``size_factor``,
    which each must take (else a 400 naming ``size``)."""
    dit = [(stage, stage_limits) for stage, stage_limits in zip(stages, limits, strict=True)
           if stage.engine_type == "dit"]  # fmt: skip
    factor = math.lcm(*(stage_limits.size_factor for _, stage_limits in dit)) if dit else 1
    width, height = (max(factor, side - side % factor) for side in image.size)
    for stage, stage_limits in dit:
        try:
            stage_limits.check_size(height, width)
        except ValueError as error:
            raise ImageRequestError(
                "size",
                f"size 'auto' is the image's size, {width}x{height} (multiples of {factor}), which "
                f"{stage.label} refuses: {error}; give a size",
            ) from None
    return f"{width}x{height}"
