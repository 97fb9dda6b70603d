"""What an omni pipeline returns per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class OmniRequestOutput:
    """The final result of one request, and what each stage produced for it."""

    request_id: str
    prompt: Any
    """The request's input as given to the first stage."""
    text: str | None = None
    """Generated text of the last text-producing final stage."""
    images: Any = None
    """Images of the last image-producing final stage (list of PIL images, or a float array NHWC)."""
    latents: Any = None
    """Final latents of the last DiT stage, when asked for."""
    stage_outputs: dict[int, Any] = field(default_factory=dict)
    """Each stage's own output object by ``stage_id`` (``vllm.RequestOutput`` or ``DiffusionOutput``)."""
    error: str | None = None
    """Why the request failed (naming the stage); None on success."""

    @property
    def finished(self) -> bool:
        return True
