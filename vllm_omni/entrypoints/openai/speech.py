"""``POST /v1/audio/speech`` (OpenAI's ``audio.speech.create``): a text spoken through the omni pipeline.

The text is given as the thinker's reply (``REPLY_IN_PROMPT``): its prompt is a chat turn asking for the
text followed by the text itself, the thinker generates one token, and the talker and code2wav speak the
text as if the thinker had answered it. The response body is the audio: ``wav`` (default), ``flac`` or
``pcm`` (raw 16-bit little-endian samples, 24 kHz mono).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from vllm_omni.audio.wav import encode
from vllm_omni.entrypoints.openai.chat_audio import AudioRequestError, check_voice, pipeline_voices
from vllm_omni.entrypoints.openai.omni_server import ServerError, server_of
from vllm_omni.pipeline.qwen2_5_omni import REPLY_IN_PROMPT

SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
"""The system turn Qwen2.5-Omni's model card asks for when it answers in speech."""
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm"}
MAX_INPUT_CHARS = 4096
"""OpenAI's bound on ``input``."""

router = APIRouter()


class SpeechRequest(BaseModel):
    """The body of ``POST /v1/audio/speech`` (OpenAI's fields; ``speed`` 1 and no ``instructions``)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    """Any name (the server serves one model), as the images endpoints take it."""
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    """The text to speak."""
    voice: str
    """One of the model's voices (``spk_dict.pt``: e.g. Chelsie, Ethan)."""
    response_format: Literal["wav", "flac", "pcm"] = "wav"
    speed: Literal[1.0] = 1.0
    """Only the model's own pace is served."""


def speech_prompt(tokenizer: Any, text: str, voice: str) -> dict[str, Any]:
    """The thinker prompt that speaks ``text`` in ``voice``: the chat turn asking for it, then the text as
    the reply (``REPLY_IN_PROMPT``)."""
    turns = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
    asking = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    reply = tokenizer.encode(text, add_special_tokens=False)
    return {"prompt_token_ids": [*_ids(asking), *reply], "voice": voice, REPLY_IN_PROMPT: len(reply)}


@router.post("/v1/audio/speech", response_class=Response)
async def create_speech(body: SpeechRequest, request: Request) -> Response:
    """The audio of ``body.input`` spoken in ``body.voice``."""
    server = server_of(request)
    stages = server.omni.stages
    try:
        check_voice(body.voice, pipeline_voices(stages, server.omni.manager.running.limits), "voice")
    except AudioRequestError as error:
        raise ServerError(400, str(error), error.param) from None
    prompt = speech_prompt(request.app.state.speech_tokenizer, body.input, body.voice)
    params: list[Any] = [None] * len(stages)
    params[0] = {"max_tokens": 1, "temperature": 0.0}  # the token after the reply: not spoken
    result = await server.run(request, server.generate(prompt, params))
    audio_format = "pcm16" if body.response_format == "pcm" else body.response_format
    return Response(encode(result.audio, audio_format), media_type=MEDIA_TYPES[body.response_format])


def _ids(encoded: Any) -> list[int]:
    """Token ids from ``apply_chat_template(tokenize=True)`` (a list, or a ``BatchEncoding`` in
    transformers 5)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
