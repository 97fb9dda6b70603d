"""``POST /generate``: the native endpoint of any pipeline.

The body is a prompt and each stage's params by stage id; the answer is the final text, images (base64
PNG), latents (when a dit stage is asked for them), audio (float32 samples as a tensor, with their
``sample_rate``) and a summary of each returned stage. With ``stream``
the same comes as server-sent events while the request runs:

- ``text`` ``{"stage_id", "delta"}``: an ar stage's new text, token by token;
- ``partial_image`` ``{"stage_id", "index", "image"}``: a dit stage's preview (``partial_images``);
- ``stage`` ``{"stage_id", "kind", ...summary}``: a returned stage is done;
- ``done``: the whole response, as without ``stream``; or ``error`` ``{"error": {...}}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from vllm_omni.audio.code2wav_request import SAMPLE_RATE
from vllm_omni.entrypoints.openai.images import encode_image
from vllm_omni.entrypoints.openai.tensors import encode_tensor
from vllm_omni.pipeline.kinds import get_stage_kind


class GenerateRequest(BaseModel):
    """The body of ``POST /generate``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | dict[str, Any]
    """A text, or a prompt dict of the first stage (e.g. ``{"prompt_token_ids": [...]}``)."""
    params: dict[int, dict[str, Any]] = {}
    """Each stage's params by stage id (fields of ``SamplingParams`` / ``DiffusionSamplingParams``)."""
    stream: bool = False
    """Send server-sent events while the request runs (see the module docstring)."""


def stage_params(stages: list[Any], by_stage: dict[int, dict[str, Any]]) -> list[Any]:
    """Every stage's params entry (None: its defaults); ValueError naming stage ids the pipeline lacks."""
    unknown = sorted(set(by_stage) - {stage.stage_id for stage in stages})
    if unknown:
        raise ValueError(f"no stage {unknown} in this pipeline")
    return [by_stage.get(stage.stage_id) for stage in stages]


def generate_response(stages: list[Any], result: Any) -> dict[str, Any]:
    """The JSON answer for a finished request."""
    response = {
        "request_id": result.request_id,
        "text": result.text,
        "images": [encode_image(_as_pil(image), "png", None) for image in _listed(result.images)],
        "stages": {
            stage_id: _summary(stages, stage_id, output) for stage_id, output in result.stage_outputs.items()
        },
    }
    if result.latents is not None:
        response["latents"] = encode_tensor(result.latents)
    if result.audio is not None:
        response["audio"] = {"sample_rate": SAMPLE_RATE, **encode_tensor(torch.from_numpy(result.audio))}
    return response


async def generate_events(stages: list[Any], snapshots: AsyncIterator[Any]) -> AsyncIterator[tuple[str, Any]]:
    """``(event, data)`` for each snapshot of a request; the last is ``done`` with the finished output
    (the caller checks its ``error``), after a ``stage`` event for every returned stage when it succeeded."""
    sent_text: dict[int, int] = {}
    summarized: set[int] = set()
    async for output in snapshots:
        if output.finished and output.error is not None:
            yield "done", output
            return
        stage_output = output.stage_outputs.get(output.stage_id)
        if stages[output.stage_id].engine_type == "ar" and stage_output is not None:
            text = stage_output.outputs[0].text
            start = sent_text.get(output.stage_id, 0)
            if len(text) > start:
                sent_text[output.stage_id] = len(text)
                yield "text", {"stage_id": output.stage_id, "delta": text[start:]}
        index = getattr(stage_output, "partial_image_index", None)
        if index is not None:
            image = encode_image(_as_pil(_listed(stage_output.images)[0]), "png", None)
            yield "partial_image", {"stage_id": output.stage_id, "index": index, "image": image}
        for stage_id in sorted(output.stage_outputs):
            if stage_id not in summarized and (output.finished or stage_id < output.stage_id):
                summarized.add(stage_id)
                yield (
                    "stage",
                    {"stage_id": stage_id, **_summary(stages, stage_id, output.stage_outputs[stage_id])},
                )
        if output.finished:
            yield "done", output
            return


def _summary(stages: list[Any], stage_id: int, output: Any) -> dict[str, Any]:
    kind = stages[stage_id].engine_type
    return {"kind": kind, **get_stage_kind(kind).summarize(output)}


def _listed(images: Any) -> Any:
    """A DiT stage's images: a list of PIL images, an NHWC float array (``output_type="np"``), or None."""
    return () if images is None else images


def _as_pil(image: Any) -> Any:
    if isinstance(image, np.ndarray):  # HWC, values in [0, 1]
        return Image.fromarray((image.clip(0, 1) * 255).round().astype(np.uint8).squeeze())
    return image
