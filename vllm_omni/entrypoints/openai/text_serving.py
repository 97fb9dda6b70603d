"""``/v1/chat/completions`` and ``/v1/completions`` for pipelines that start and end with an ``ar`` stage.

They are vLLM's own: its routes and its ``OpenAIServingChat`` / ``OpenAIServingCompletion`` render each
request in the server (chat template, tokenizer, multimodal processor of the first stage's model), check it,
build its ``SamplingParams`` and turn the engine's ``RequestOutput``s into responses and SSE chunks. The
engine they ask is ``PipelineEngineClient``: it sends the rendered input through the pipeline and yields
the last stage's outputs. So validation, streaming, logprobs, usage, tool and reasoning parsers and the
per-choice tensors (mm_embedding, prompt hidden states: vllm-omni's patches of those classes, see
``tensor_fields``) are what ``vllm serve`` gives without ``--omni``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from vllm_omni.entrypoints.openai.chat_audio import (
    ANSWER,
    AudioAnswer,
    OmniServingChat,
    audio_stage,
    pipeline_voices,
)

if TYPE_CHECKING:
    from vllm_omni.entrypoints.openai.omni_server import OmniServer

CHAT_FLAGS = {
    "chat_template": "the chat template (a file or the template itself; default: the tokenizer's)",
    "chat_template_content_format": "how message content is passed to the template: auto, string, openai",
    "response_role": "the role of the generated message (default: assistant)",
    "tool_call_parser": "parse tool calls out of the generated text with this vLLM tool parser",
}
"""The chat flags of ``vllm serve`` that ``vllm serve --omni`` takes too (vLLM's meaning and defaults)."""
CHAT_SWITCHES = {
    "enable_auto_tool_choice": "let the model call tools on its own (needs --tool-call-parser)",
    "enable_prompt_tokens_details": "report cached prompt tokens in usage.prompt_tokens_details",
    "enable_force_include_usage": "include usage in every response, streamed ones too",
}


ANSWERS = frozenset({"text", "hidden_states", "audio"})
"""What the final stages of a pipeline that answers in text (and speech) make."""


def text_stage(stages: list[Any]) -> int | None:
    """The stage whose text chat and completion requests return: the last final stage making text, in a
    pipeline that starts with an ``ar`` stage and answers in text (its final stages make text, hidden
    states or audio: an LLM, AR -> AR, Qwen2.5-Omni's thinker -> talker -> code2wav). None for others
    (e.g. AR -> DiT answers with images)."""
    finals = [s for s in stages if s.final_output]
    if stages[0].engine_type != "ar" or any(set(s.output_modalities) - ANSWERS for s in finals):
        return None
    texts = [s.stage_id for s in finals if s.engine_type == "ar" and "text" in s.output_modalities]
    return texts[-1] if texts else None


def serves_text(stages: list[Any]) -> bool:
    """Whether the pipeline takes a prompt and returns text the way a vLLM engine does (``text_stage``)."""
    return text_stage(stages) is not None


def add_chat_args(group: Any) -> None:
    """``vllm serve``'s chat flags (see ``CHAT_FLAGS``) on ``group``."""
    for name, help_text in CHAT_FLAGS.items():
        group.add_argument(f"--{name.replace('_', '-')}", help=help_text)
    for name, help_text in CHAT_SWITCHES.items():
        group.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=help_text)


class PipelineEngineClient:
    """The part of vLLM's ``EngineClient`` that its OpenAI serving classes use, over the server's pipeline.

    A request's rendered input goes to the first stage; its ``SamplingParams`` to the text stage
    (``text_stage``: the one whose text is returned, where the request ends; earlier stages use their
    defaults). The pipeline streams that stage's tokens as vLLM's ``AsyncLLM`` does (``output_kind``
    DELTA or FINAL_ONLY, as the serving class asks). LoRA, priorities, data-parallel ranks, sessions and
    KV hints are not used by the pipeline.
    """

    def __init__(self, server: OmniServer, vllm_config: Any) -> None:
        from vllm.renderers import renderer_from_config
        from vllm.v1.engine.input_processor import InputProcessor

        self.server = server
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer_from_config(vllm_config)
        self.input_processor = InputProcessor(vllm_config, self.renderer)

    @property
    def errored(self) -> bool:
        return self.server.omni.manager.dead is not None

    @property
    def dead_error(self) -> Exception:
        from vllm.exceptions import GracefulHTTPError

        return GracefulHTTPError(str(self.server.omni.manager.dead), HTTPStatus.SERVICE_UNAVAILABLE)

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        """Refuse a request (429) while the server holds ``--max-queued-requests``."""
        self.server.check_room()

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, **_unused: Any
    ) -> AsyncIterator[Any]:
        """The text stage's ``RequestOutput``s of one request, which ends there, or at the audio stage when
        the chat request being served asks for audio (``chat_audio.ANSWER``, read now: vLLM iterates the
        outputs later). A request a stage refuses raises ValueError (400), one that fails in a stage
        vLLM's ``GenerationError`` (500, or 503 once a stage is gone)."""
        return self._generate(prompt, sampling_params, request_id, ANSWER.get())

    async def _generate(
        self, prompt: Any, sampling_params: Any, request_id: str, answer: AudioAnswer | None
    ) -> AsyncIterator[Any]:
        from vllm.exceptions import GenerationError
        from vllm.sampling_params import RequestOutputKind

        omni = self.server.omni
        last = text_stage(omni.stages)
        params: list[Any] = [None] * len(omni.stages)
        params[last] = sampling_params
        modalities, deltas = ["text"], None
        # With audio the text stage hands its whole output on: streamed cumulative, sent as deltas.
        if answer is not None:
            prompt = {**prompt, "voice": answer.voice}
            params[audio_stage(omni.stages)] = answer.code2wav_params()
            modalities = ["text", "audio"]
            if sampling_params.output_kind == RequestOutputKind.DELTA:
                params[last] = sampling_params.clone()
                params[last].output_kind, deltas = RequestOutputKind.CUMULATIVE, _Deltas()
        self.server.held += 1
        try:
            entries = params if len(params) > 1 else sampling_params
            async for output in omni.generate(prompt, entries, request_id, modalities=modalities):
                if output.refused:
                    raise ValueError(output.error)
                if output.error is not None:
                    error = GenerationError(output.error)
                    error.status_code = HTTPStatus(self.server.failure(output.error).status)
                    raise error
                if output.stage_id == last and last in output.stage_outputs:
                    text_output = output.stage_outputs[last]
                    yield text_output if deltas is None else deltas(text_output)
                if answer is not None:
                    answer.take(output.audio)
        finally:
            self.server.held -= 1
            if answer is not None:
                answer.end()

    async def abort(self, request_id: str | list[str]) -> None:
        await self.server.omni.abort(request_id)


class _Deltas:
    """One request's cumulative ``RequestOutput``s (of one sequence) as DELTA ones: what vLLM's streaming
    chat reads."""

    def __init__(self) -> None:
        self.text = self.tokens = 0

    def __call__(self, output: Any) -> Any:
        (whole,) = output.outputs
        logprobs = None if whole.logprobs is None else whole.logprobs[self.tokens :]
        delta = dataclasses.replace(
            whole, text=whole.text[self.text :], token_ids=whole.token_ids[self.tokens :], logprobs=logprobs
        )
        self.text, self.tokens = len(whole.text), len(whole.token_ids)
        result = copy.copy(output)
        result.outputs = [delta]
        return result


def attach_text_serving(app: FastAPI, server: OmniServer, args: argparse.Namespace) -> None:
    """Serve vLLM's chat and completion routes on ``app`` over ``server``'s pipeline (one that
    ``serves_text``), configured like ``vllm serve`` from ``args``."""
    from vllm.entrypoints.openai.chat_completion.api_router import router as chat_router
    from vllm.entrypoints.openai.chat_completion.batch_serving import OpenAIServingChatBatch
    from vllm.entrypoints.openai.completion.api_router import router as completion_router
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.renderers.chat_utils import load_chat_template
    from vllm.renderers.online_renderer import OnlineRenderer

    from vllm_omni.entrypoints.openai.speech import router as speech_router

    frontend = _frontend_args(args)
    client = PipelineEngineClient(server, _engine_config(server, args))
    models = OpenAIServingModels(
        engine_client=client,
        base_model_paths=[BaseModelPath(name=server.model_name, model_path=server.omni.stages[0].model_path)],
    )
    template = load_chat_template(frontend.chat_template)
    chat_options = {
        "chat_template": template,
        "chat_template_content_format": frontend.chat_template_content_format,
        "enable_auto_tools": frontend.enable_auto_tool_choice,
        "tool_parser": frontend.tool_call_parser,
        "reasoning_parser": client.vllm_config.structured_outputs_config.reasoning_parser,
    }
    renderer = OnlineRenderer(
        model_config=client.model_config, renderer=client.renderer, request_logger=None, **chat_options
    )
    common = {
        "engine_client": client,
        "models": models,
        "online_renderer": renderer,
        "request_logger": None,
        "enable_prompt_tokens_details": frontend.enable_prompt_tokens_details,
        "enable_force_include_usage": frontend.enable_force_include_usage,
    }
    chat = dict(common, response_role=frontend.response_role, **chat_options)
    app.state.args = frontend
    app.state.enable_server_load_tracking = False
    voices = pipeline_voices(server.omni.stages, server.omni.manager.running.limits)
    app.state.openai_serving_chat = OmniServingChat(**chat, voices=voices)
    app.state.openai_serving_chat_batch = OpenAIServingChatBatch(**chat)
    app.state.openai_serving_completion = OpenAIServingCompletion(**common)
    app.include_router(chat_router)
    app.include_router(completion_router)
    if voices is not None:  # a pipeline that speaks: /v1/audio/speech too
        app.state.speech_tokenizer = client.renderer.get_tokenizer()
        app.include_router(speech_router)


def _frontend_args(args: argparse.Namespace) -> argparse.Namespace:
    """vLLM's server settings (``FrontendArgs`` defaults) with the chat flags ``args`` set."""
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    settings = dataclasses.asdict(FrontendArgs())
    for name in (*CHAT_FLAGS, *CHAT_SWITCHES):
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    return argparse.Namespace(**settings)


def _engine_config(server: OmniServer, args: argparse.Namespace) -> Any:
    """The first stage's ``VllmConfig``, as its engine builds it, for rendering requests in the server.
    The server keeps no multimodal processor cache: the stage gets each item whole."""
    from vllm.usage.usage_lib import UsageContext

    from vllm_omni.engine.arg_utils import OmniAsyncEngineArgs

    stage = server.omni.stages[0]
    engine_args = {**stage.engine_args, "mm_processor_cache_gb": 0}
    if getattr(args, "served_model_name", None):
        engine_args["served_model_name"] = args.served_model_name
    return OmniAsyncEngineArgs(model=stage.model_path, **engine_args).create_engine_config(
        UsageContext.OPENAI_API_SERVER
    )
