"""Stage-input functions: how an earlier stage's output becomes a stage's prompt.

A stage config names its function (``stage_input``); the manager calls it when the source stage has
finished a request. Built-in functions cover the hand-offs of this release; users add theirs with
``register_stage_input`` (in the process that builds the pipeline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from vllm_omni.config.stage import OmniStageConfig

DIT_TEXT_MAX_TOKENS = 512
"""Tokens of a chat-templated prompt kept for a DiT's LM text encoder (diffusers' ``max_sequence_length``)."""


@dataclass
class StageInput:
    """What a stage-input function sees for one request."""

    prompt: Any
    """The request's original prompt (as given to the pipeline)."""
    outputs: dict[int, Any]
    """The outputs of the stages that have run, by ``stage_id``."""
    stage: OmniStageConfig
    """The stage being fed."""

    @property
    def source(self) -> Any:
        """The output of the stage feeding this one (``stage.source_stage``)."""
        return self.outputs[self.stage.source_stage]

    @property
    def text(self) -> str | None:
        """The text of the original prompt (a string, or a dict's ``prompt``)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt.get("prompt")


StageInputFn = Callable[[StageInput], Any]
_REGISTRY: dict[str, StageInputFn] = {}


def register_stage_input(name: str) -> Callable[[StageInputFn], StageInputFn]:
    """Decorator: register ``fn(StageInput) -> prompt`` under ``name`` for ``OmniStageConfig.stage_input``."""

    def register(fn: StageInputFn) -> StageInputFn:
        _REGISTRY[name] = fn
        return fn

    return register


def stage_input_names() -> list[str]:
    """Names of the registered stage-input functions."""
    return sorted(_REGISTRY)


def get_stage_input(name: str) -> StageInputFn:
    """The function registered under ``name`` (ValueError listing the registered names otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown stage_input {name!r}; registered: {stage_input_names()}")
    return _REGISTRY[name]


@register_stage_input("prompt")
def original_prompt(data: StageInput) -> Any:
    """The request's own prompt (the first stage's default)."""
    return data.prompt


@register_stage_input("text")
def generated_text(data: StageInput) -> dict[str, str]:
    """The source AR stage's generated text as the prompt (prompt expansion, text-to-text)."""
    return {"prompt": data.source.outputs[0].text}


@register_stage_input("hidden_states")
def prompt_hidden_states(data: StageInput) -> dict[str, Any]:
    """The source AR stage's prompt hidden states as a DiT's text conditioning (``prompt_embeds``)."""
    embeds = data.source.outputs[0].prompt_hidden_states
    if embeds is None:
        raise ValueError(f"stage {data.stage.source_stage} returned no prompt hidden states")
    return {"prompt_embeds": embeds}


@register_stage_input("image")
def generated_image(data: StageInput) -> dict[str, Any]:
    """The source DiT stage's first image as the init image, with the request's text (image-to-image)."""
    return {"prompt": data.text or "", "image": data.source.images[0]}


@register_stage_input("chat_template")
def chat_template_ids(data: StageInput) -> dict[str, list[int]]:
    """The prompt text in the stage model's chat template, as token ids, the way a DiT with an LM text
    encoder (Z-Image, Qwen-Image) encodes it: a user turn, generation prompt, first 512 tokens kept."""
    tokenizer = _tokenizer(data.stage.model_path)
    messages = [{"role": "user", "content": data.text or ""}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return {"prompt_token_ids": tokenizer(text)["input_ids"][:DIT_TEXT_MAX_TOKENS]}


@cache
def _tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def default_stage_input(stage: OmniStageConfig, source: OmniStageConfig | None) -> str:
    """The function a stage gets when its config names none, from its modalities and its source's."""
    if source is None:
        return "prompt"
    if "hidden_states" in stage.input_modalities:
        return "hidden_states"
    if "image" in stage.input_modalities and "image" in source.output_modalities:
        return "image"
    return "text"
