"""Chat answers in speech too: ``modalities: ["text", "audio"]`` and ``audio: {voice, format}``.

As OpenAI's API does, the answer's ``message.audio`` is ``{id, data (base64), expires_at, transcript}``.
Streamed (``stream: true``; ``pcm16`` only, as OpenAI streams it), the text deltas come first, then the
audio as chunks whose ``delta.audio`` is ``{id, data}``, made chunk by chunk by the audio stage, then one
with ``{id, expires_at, transcript}``, then the finishing chunk. The text is vLLM's own answer, unchanged.

``OmniServingChat`` is vLLM's ``OpenAIServingChat`` with that one addition: the request's ``AudioAnswer``
is bound (``ANSWER``) while vLLM's serving class calls the pipeline's ``generate``
(``PipelineEngineClient``), which then runs the request to its audio stage and hands the audio over.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import numpy as np
from openai.types.chat.chat_completion_audio import ChatCompletionAudio
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from vllm_omni.audio.wav import FORMATS, encode, pcm16

MODALITIES = ("text", "audio")
STREAM_FORMAT = "pcm16"
STREAM_CHUNK_CODES = 50
"""Codes per audio chunk of a streamed answer (2 s of audio at Qwen2.5-Omni's 25 codes a second)."""
EXPIRES_SECONDS = 3600
"""``message.audio.expires_at``: an hour after the answer (nothing is kept: the field is OpenAI's)."""


class AudioRequestError(ValueError):
    """A chat request whose audio fields the server refuses; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class AudioAnswer:
    """The audio of one chat answer: what the request asks for, and the waveform as the pipeline makes it."""

    voice: str
    audio_format: str
    stream: bool
    audio_id: str = field(default_factory=lambda: f"audio_{uuid4().hex}")
    waveform: np.ndarray | None = None
    """The answer's audio so far (float32, 24 kHz)."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """A streamed answer's events: ``("audio", new float32 samples)``, ``("audio_end", None)`` (put by
    the pipeline's side), ``("sse", vLLM's chunk)``, ``("sse_end", None)`` (put by ``with_audio``)."""

    @classmethod
    def of(cls, request: Any, voices: tuple[str, ...] | None) -> AudioAnswer | None:
        """The audio a chat request asks for (None: text only); ``voices``: the pipeline's (None: it makes
        no audio). AudioRequestError naming the field it refuses."""
        extra = request.model_extra or {}
        modalities, audio = extra.get("modalities"), extra.get("audio")
        if modalities is not None and (
            not isinstance(modalities, list) or not modalities or any(m not in MODALITIES for m in modalities)
        ):
            raise AudioRequestError(
                f"modalities must be a non-empty list of {list(MODALITIES)}", "modalities"
            )
        if "audio" not in (modalities or ()):
            if audio is not None:
                raise AudioRequestError(
                    "audio is given but modalities does not ask for 'audio'", "modalities"
                )
            return None
        if voices is None:
            raise AudioRequestError(
                "this model answers in text only: modalities must be ['text']", "modalities"
            )
        return cls._asked(request, audio, voices)

    @classmethod
    def _asked(cls, request: Any, audio: Any, voices: tuple[str, ...]) -> AudioAnswer:
        if not isinstance(audio, dict) or not set(audio) <= {"voice", "format"} or "voice" not in audio:
            raise AudioRequestError(
                "audio must be an object {voice, format} when modalities asks for it", "audio"
            )
        check_voice(audio["voice"], voices, "audio.voice")
        stream = bool(request.stream)
        audio_format = audio.get("format", STREAM_FORMAT if stream else "wav")
        allowed = [STREAM_FORMAT] if stream else list(FORMATS)
        if audio_format not in allowed:
            streamed = " (a streamed answer's audio)" if stream else ""
            message = f"audio.format must be one of {allowed}{streamed}, got {audio_format!r}"
            raise AudioRequestError(message, "audio.format")
        if request.n != 1:
            raise AudioRequestError(f"n must be 1 for an answer with audio, got {request.n}", "n")
        return cls(audio["voice"], audio_format, stream)

    def code2wav_params(self) -> dict[str, Any]:
        """The audio stage's params: chunk by chunk when the answer streams."""
        return {"chunk_size": STREAM_CHUNK_CODES} if self.stream else {}

    def take(self, audio: np.ndarray | None) -> None:
        """A pipeline snapshot's audio (the whole so far); a streamed answer queues the new samples."""
        if audio is None:
            return
        sent = 0 if self.waveform is None else len(self.waveform)
        self.waveform = audio
        if self.stream and len(audio) > sent:
            self.events.put_nowait(("audio", audio[sent:]))

    def end(self) -> None:
        """No more audio (the request finished, failed or was aborted)."""
        self.events.put_nowait(("audio_end", None))

    def message_audio(self, transcript: str) -> dict[str, Any]:
        """``message.audio`` of the whole answer."""
        data = b"" if self.waveform is None else encode(self.waveform, self.audio_format)
        return {**self._header(), "data": base64.b64encode(data).decode(), "transcript": transcript}

    async def with_audio(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """vLLM's SSE ``chunks`` of the answer with its audio chunks put in before the finishing chunk."""
        pump = asyncio.ensure_future(_pump(chunks, self.events))
        answer = _StreamedAnswer()
        held: list[str] = []  # the finishing chunk, until the audio is done
        audio_done = False
        try:
            while True:
                kind, item = await self.events.get()
                if kind == "audio":
                    yield answer.chunk({"id": self.audio_id, "data": base64.b64encode(pcm16(item)).decode()})
                elif kind == "audio_end":
                    audio_done = True
                    if self.waveform is not None:  # else the request failed: vLLM's error chunk follows
                        yield answer.chunk({**self._header(), "transcript": answer.text})
                    if held:
                        yield held.pop()
                elif kind == "sse" and answer.read(item) and not audio_done:
                    now, later = answer.split(item)  # its text now, its finish after the audio
                    yield now
                    held.append(later)
                elif kind == "sse":
                    yield item
                else:  # vLLM's stream ended (after the pipeline's, unless it failed before it began)
                    if held:
                        yield held.pop()
                    return
        finally:
            pump.cancel()

    def _header(self) -> dict[str, Any]:
        return {"id": self.audio_id, "expires_at": int(time.time()) + EXPIRES_SECONDS}


class _StreamedAnswer:
    """What the audio chunks of a streamed answer take from vLLM's chunks: the chunk id, model, creation
    time and the text so far."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.text = ""

    def read(self, event: str) -> bool:
        """Read one of vLLM's SSE events; whether it finishes the choice (has a ``finish_reason``)."""
        chunk = _chunk(event)
        if chunk is None:
            return False
        self.head = self.head or {key: chunk.get(key) for key in ("id", "object", "created", "model")}
        finishes = False
        for choice in chunk.get("choices") or ():
            self.text += (choice.get("delta") or {}).get("content") or ""
            finishes = finishes or choice.get("finish_reason") is not None
        return finishes

    @staticmethod
    def split(event: str) -> tuple[str, str]:
        """A finishing chunk as two: its delta without the finish, and the finish without the delta."""
        now, later = _chunk(event), _chunk(event)
        for choice in now["choices"]:
            choice["finish_reason"] = choice["stop_reason"] = None
        for choice in later["choices"]:
            choice["delta"] = {}
        return _event(now), _event(later)

    def chunk(self, audio: dict[str, Any]) -> str:
        """An SSE chunk whose only choice's delta is ``audio``."""
        choice = {"index": 0, "delta": {"audio": audio}, "logprobs": None, "finish_reason": None}
        return _event({**self.head, "choices": [choice]})


def _chunk(event: str) -> dict[str, Any] | None:
    """The JSON of an SSE ``data:`` event (None for ``[DONE]``)."""
    return json.loads(event[len("data: ") :]) if event.startswith("data: {") else None


def _event(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


async def _pump(chunks: AsyncIterator[str], events: asyncio.Queue) -> None:
    """vLLM's chunks into the answer's events, then ``("sse_end", None)``."""
    try:
        async for chunk in chunks:
            events.put_nowait(("sse", chunk))
    finally:
        events.put_nowait(("sse_end", None))


ANSWER: ContextVar[AudioAnswer | None] = ContextVar("audio_answer", default=None)
"""The audio answer of the chat request being rendered (read by ``PipelineEngineClient.generate``)."""


def audio_stage(stages: list[Any]) -> int | None:
    """The last final stage making audio (None: the pipeline makes none)."""
    found = [s.stage_id for s in stages if s.final_output and "audio" in s.output_modalities]
    return found[-1] if found else None


def check_voice(voice: Any, voices: tuple[str, ...], param: str) -> None:
    """AudioRequestError naming ``param`` unless ``voice`` is one of ``voices``."""
    if voice not in voices:
        raise AudioRequestError(f"{param} must be one of {list(voices)}, got {voice!r}", param)


def pipeline_voices(stages: list[Any], limits: list[Any]) -> tuple[str, ...] | None:
    """The voices of the pipeline's audio stage (its published limits), None when it makes no audio."""
    stage = audio_stage(stages)
    return None if stage is None else tuple(limits[stage].voices)


class OmniServingChat(OpenAIServingChat):
    """vLLM's chat serving, answering in audio too where a request asks for it (see the module doc)."""

    def __init__(self, *args: Any, voices: tuple[str, ...] | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.voices = voices
        """The voices of the pipeline's audio stage (None: it makes no audio)."""

    async def create_chat_completion(self, request: Any, raw_request: Any = None) -> Any:
        try:
            answer = AudioAnswer.of(request, self.voices)
        except AudioRequestError as error:
            return self.create_error_response(str(error), param=error.param)
        if answer is None:
            return await super().create_chat_completion(request, raw_request)
        bound = ANSWER.set(answer)
        try:
            result = await super().create_chat_completion(request, raw_request)
        finally:
            ANSWER.reset(bound)
        if isinstance(result, ChatCompletionResponse):
            message = result.choices[0].message
            message.audio = ChatCompletionAudio(**answer.message_audio(message.content or ""))
            return result
        return result if isinstance(result, ErrorResponse) else answer.with_audio(result)
