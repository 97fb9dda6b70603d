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
    """(1, num_codes) codec token ids: all of them, or those known so far while ``input_done`` is False."""
    params: Code2WavParams
    noise: torch.Tensor
    """(1, frames, mel_dim): the initial noise of every code's mel frames (for an open request, of the most
    codes a request may bring: ``torch.randn``'s first values do not depend on how many it draws)."""
    block_codes: int
    input_done: bool = True
    """Every code is known (an open request's input grows until it is)."""
    next_chunk: int = 0
    pieces: list[np.ndarray] = field(default_factory=list)
    """Chunks made but not yet sent (all of them unless ``params.emit_chunks``)."""
    sent_samples: int = 0
    """Samples already sent (where the next output starts)."""

    @property
    def windows(self) -> list[ChunkWindow]:
        """The chunks of the codes known now (the last ones may still grow)."""
        return chunk_windows(self.codes.shape[1], self.params, self.block_codes)

    @property
    def window(self) -> ChunkWindow | None:
        """The next chunk, when it can be made: every code it and its right context need is known (its
        window is then what the whole input gives it)."""
        windows = self.windows
        if self.next_chunk >= len(windows):
            return None
        window, size = windows[self.next_chunk], self.params.chunk_size
        if self.input_done:
            return window
        whole = size is not None and window.end - window.start == size
        return window if whole and window.window_end == window.end + self.params.right_context else None

    @property
    def finished(self) -> bool:
        return self.input_done and self.next_chunk == len(self.windows)


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

    def add_request(self, request_id: str, prompt: dict, params: Code2WavParams, open: bool = False) -> None:
        """Validate and queue a request (ValueError naming the field when it is refused). A prompt's
        ``voice`` (a pipeline hands on its request's) takes the place of the params' voice. ``open``: the
        codes are those known so far; ``extend_request`` brings the rest."""
        if "voice" in _checked(prompt):
            params = dataclasses.replace(params, voice=prompt["voice"])
        self.limits.check_params(params)
        codes = self.limits.check_codes(prompt["codes"])
        if self._find(request_id) is not None:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if len(self.waiting) + len(self.running) >= self.limits.max_num_requests:
            raise ValueError(f"the stage holds {self.limits.max_num_requests} requests (max_num_requests)")
        generator = torch.Generator().manual_seed(params.seed)
        noise = self.token2wav.noise(self.limits.max_codes if open else len(codes), generator)
        block_codes = self.token2wav.block_codes
        self.waiting.append(
            Code2WavRequest(request_id, torch.tensor([codes]), params, noise, block_codes, not open)
        )

    def extend_request(self, request_id: str, prompt: dict, done: bool) -> None:
        """An open request's codes so far (those it had, then new ones); ``done``: all of them."""
        request = self._find(request_id)
        if request is None or request.input_done:
            raise ValueError(f"request {request_id!r} is not an open request of this stage")
        codes = self.limits.check_codes(_checked(prompt)["codes"])
        known = request.codes[0].tolist()
        if codes[: len(known)] != known:
            raise ValueError(f"request {request_id!r}: codes must extend the {len(known)} codes it has")
        request.codes, request.input_done = torch.tensor([codes]), done

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
            if request.window is not None:
                groups[self._batch_key(request)].append(request)
        outputs = []
        for group in groups.values():
            outputs += self._make_chunks(group)
        self.running = [r for r in self.running if not r.finished]
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Whether a step has work: requests to admit, or a chunk that can be made (an open request waiting
        for codes is not work: its stage waits for them)."""
        admits = self.waiting and len(self.running) < self.config.max_batch_size
        return bool(admits) or any(r.window is not None for r in self.running)

    def _find(self, request_id: str) -> Code2WavRequest | None:
        return next((r for r in self.waiting + self.running if r.request_id == request_id), None)

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
            if request.params.emit_chunks or request.finished:
                outputs.append(self._take_output(request))
        return outputs

    def _take_output(self, request: Code2WavRequest) -> Code2WavOutput:
        """The audio made since the last output (the whole waveform unless the request emits chunks)."""
        waveform = np.concatenate(request.pieces)
        output = Code2WavOutput(
            request.request_id, waveform, request.sent_samples, request.codes.shape[1], request.finished
        )  # fmt: skip
        request.pieces, request.sent_samples = [], request.sent_samples + len(waveform)
        return output


def _checked(prompt: object) -> dict:
    """A code2wav prompt (ValueError naming what it must be)."""
    if not isinstance(prompt, dict) or "codes" not in prompt or not set(prompt) <= {"codes", "voice"}:
        got = sorted(prompt) if isinstance(prompt, dict) else type(prompt).__name__
        raise ValueError(f"a code2wav prompt is {{'codes': [codec ids], optional 'voice'}}, got {got}")
    return prompt
