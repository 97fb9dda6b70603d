"""What an omni pipeline returns per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class OmniRequestOutput:
    """One request's result so far: the final outputs, and what each stage produced for it.

    ``OmniLLM`` returns it once per request (``finished``); ``AsyncOmniLLM`` yields a fresh snapshot each
    time a final stage reports (``stage_id`` says which; an AR stage reports every step when it streams).
    """

    request_id: str
    prompt: Any
    """The request's input as given to the first stage."""
    text: str | None = None
    """Generated text of the last text-producing final stage (so far, while it streams)."""
    images: Any = None
    """Images of the last image-producing final stage (list of PIL images, or a float array NHWC)."""
    latents: Any = None
    """Final latents of the last DiT stage, when asked for."""
    audio: Any = None
    """Float32 waveform of the last audio-producing final stage (``code2wav``: 24 kHz; so far, while it
    streams)."""
    stage_outputs: dict[int, Any] = field(default_factory=dict)
    """Each final stage's own output object by ``stage_id`` (``vllm.RequestOutput`` or ``DiffusionOutput``);
    stages with ``final_output=False`` are not returned (unless the manager keeps every stage's output)."""
    stage_id: int | None = None
    """The stage whose report this snapshot follows."""
    finished: bool = False
    """Whether the request has left the pipeline (done, failed or aborted)."""
    error: str | None = None
    """Why the request failed or stopped (naming the stage, or ``aborted``); None on success."""
    refused: bool = False
    """Whether a stage refused the request's input (the caller's fault, e.g. a token id out of the
    vocabulary; ``error`` says why) rather than failing while serving it."""

    def save_wav(self, path: Any) -> Any:
        """Write ``audio`` as a 16-bit mono WAV file at the code2wav rate (24 kHz); returns the path."""
        if self.audio is None:
            raise ValueError(f"request {self.request_id} has no audio (its pipeline or modalities made none)")
        from vllm_omni.audio.wav import save_wav

        return save_wav(path, self.audio)
