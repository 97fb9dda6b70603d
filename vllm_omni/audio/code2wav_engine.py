"""Code2WavEngine: codec tokens -> waveforms, chunk by chunk, requests batched at every step.

Each step admits waiting requests (first come, up to ``max_batch_size`` running) and makes the next chunk
of every running request: chunks whose windows have the same number of codes and whose voices' reference
clips have one shape run through the DiT's ODE and BigVGAN as one batch. transformers' DiT takes no padding
mask (its attention mask is its block pattern) and BigVGAN's convolutions would read padding at a shorter
waveform's end, so windows of different lengths run as separate batches rather than padded. A request's
noise is drawn once, for all its codes, from its own generator; a chunk's window takes its slice.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_omni.audio.code2wav_request import (
    ChunkWindow,
    Code2WavLimits,
    Code2WavOutput,
    Code2WavParams,
    chunk_windows,
)
from vllm_omni.audio.token2wav import Token2Wav
from vllm_omni.config.code2wav import Code2WavConfig


@dataclass
class Code2WavRequest:
    """A request in the engine: its codes, noise and chunks, and the audio made so far."""

    request_id: str
    codes: torch.Tensor
    """(1, num_codes) codec token ids."""
    params: Code2WavParams
    noise: torch.Tensor
    """(1, num_codes x repeats, mel_dim): the initial noise of every code's mel frames."""
    windows: list[ChunkWindow]
    next_chunk: int = 0
    pieces: list[np.ndarray] = field(default_factory=list)
    """Chunks made but not yet sent (all of them unless ``params.emit_chunks``)."""
    sent_samples: int = 0
    """Samples already sent (where the next output starts)."""

    @property
    def window(self) -> ChunkWindow:
        return self.windows[self.next_chunk]


class Code2WavEngine:
    """The token2wav of a Qwen2.5-Omni folder serving requests ``{"codes": [ids]}`` with
    :class:`Code2WavParams`."""

    def __init__(self, model_path: str, config: Code2WavConfig) -> None:
        self.config = config
        self.token2wav = Token2Wav(model_path)
        dit = self.token2wav.dit.config
        self.limits = Code2WavLimits(
            voices=tuple(self.token2wav.voices),
            num_codes=self.token2wav.dit.text_embed.codec_embed.num_embeddings,
            max_codes=dit.max_position_embeddings // dit.repeats,
            max_num_requests=config.max_batch_size + config.max_waiting_requests,
        )
        self.waiting: list[Code2WavRequest] = []
        self.running: list[Code2WavRequest] = []

    def add_request(self, request_id: str, prompt: dict, params: Code2WavParams) -> None:
        """Validate and queue a request (ValueError naming the field when it is refused). A prompt's
        ``voice`` (a pipeline hands on its request's) takes the place of the params' voice."""
        if not isinstance(prompt, dict) or "codes" not in prompt or not set(prompt) <= {"codes", "voice"}:
            got = sorted(prompt) if isinstance(prompt, dict) else type(prompt).__name__
            raise ValueError(f"a code2wav prompt is {{'codes': [codec ids], optional 'voice'}}, got {got}")
        if "voice" in prompt:
            params = dataclasses.replace(params, voice=prompt["voice"])
        self.limits.check_params(params)
        codes = self.limits.check_codes(prompt["codes"])
        if any(r.request_id == request_id for r in self.waiting + self.running):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if len(self.waiting) + len(self.running) >= self.limits.max_num_requests:
            raise ValueError(f"the stage holds {self.limits.max_num_requests} requests (max_num_requests)")
        generator = torch.Generator().manual_seed(params.seed)
        self.waiting.append(
            Code2WavRequest(
                request_id, torch.tensor([codes]), params, self.token2wav.noise(len(codes), generator),
                chunk_windows(len(codes), params, self.token2wav.block_codes),
            )
        )  # fmt: skip

    def abort_requests(self, request_ids: list[str]) -> None:
        """Drop these requests and what they hold."""
        self.waiting = [r for r in self.waiting if r.request_id not in request_ids]
        self.running = [r for r in self.running if r.request_id not in request_ids]

    def step(self) -> list[Code2WavOutput]:
        """Admit, make the next chunk of every running request (batched by window shape), report."""
        admitted = self.config.max_batch_size - len(self.running)
        self.running += self.waiting[:admitted]
        self.waiting = self.waiting[admitted:]
        groups: dict[tuple, list[Code2WavRequest]] = defaultdict(list)
        for request in self.running:
            groups[self._batch_key(request)].append(request)
        outputs = []
        for group in groups.values():
            outputs += self._make_chunks(group)
        self.running = [r for r in self.running if r.next_chunk < len(r.windows)]
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _batch_key(self, request: Code2WavRequest) -> tuple:
        window, params = request.window, request.params
        num_steps = params.num_steps or self.token2wav.num_steps
        reference_shape = tuple(self.token2wav.voices[params.voice]["ref_mel"].shape)
        return window.window_end - window.window_start, reference_shape, num_steps

    def _make_chunks(self, group: list[Code2WavRequest]) -> list[Code2WavOutput]:
        """One batch through the DiT and BigVGAN; each request's chunk cut out of its window's audio."""
        repeats, windows = self.token2wav.repeats, [r.window for r in group]
        codes = torch.cat(
            [r.codes[:, w.window_start : w.window_end] for r, w in zip(group, windows, strict=True)]
        )
        noise = torch.cat(
            [
                r.noise[:, w.window_start * repeats : w.window_end * repeats]
                for r, w in zip(group, windows, strict=True)
            ]
        )
        num_steps = group[0].params.num_steps or self.token2wav.num_steps
        mel = self.token2wav.mel(codes, [r.params.voice for r in group], noise, num_steps)
        audio = self.token2wav.waveform(mel).numpy()
        per_code = repeats * self.token2wav.samples_per_frame
        outputs = []
        for request, window, row in zip(group, windows, audio, strict=True):
            offset = window.window_start
            request.pieces.append(row[(window.start - offset) * per_code : (window.end - offset) * per_code])
            request.next_chunk += 1
            if request.params.emit_chunks or request.next_chunk == len(request.windows):
                outputs.append(self._take_output(request))
        return outputs

    def _take_output(self, request: Code2WavRequest) -> Code2WavOutput:
        """The audio made since the last output (the whole waveform unless the request emits chunks)."""
        waveform = np.concatenate(request.pieces)
        output = Code2WavOutput(
            request.request_id, waveform, request.sent_samples, request.codes.shape[1],
            finished=request.next_chunk == len(request.windows),
        )  # fmt: skip
        request.pieces, request.sent_samples = [], request.sent_samples + len(waveform)
        return output
