"""Stage-input functions: how an earlier stage's output becomes a stage's prompt.

A stage config names its function (``stage_input``); the manager calls it when the source stage has
finished a request (outside its routing lock: a slow function delays only that request). Built-in
functions cover the hand-offs of this release and say what they need of their source (``needs``) and
which kinds they feed (``targets``), which ``check_pipeline`` verifies before any stage starts. Users add
theirs with ``register_stage_input`` (in the process that builds the pipeline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.diffusion.prompt_embeds import EMBEDS_KEYS

DIT_TEXT_MAX_TOKENS = 512
"""Tokens of a chat-templated prompt kept for a DiT's LM text encoder (diffusers' ``max_sequence_length``)."""
CONDITIONING_KEYS = ("prompt", "negative_prompt", *EMBEDS_KEYS)
"""The keys of a DiT prompt a ``latents`` hand-off keeps: what conditions the denoising it continues."""


@dataclass
class StageInput:
    """What a stage-input function sees for one request."""

    prompt: Any
    """The request's original prompt (as given to the pipeline)."""
    outputs: dict[int, Any]
    """Outputs of the stages that have run, by ``stage_id``: those of final stages, and of non-final stages
    that still feed a later stage (all of them with ``StageManager(keep_stage_outputs=True)``)."""
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


@dataclass(frozen=True)
class _Registered:
    fn: StageInputFn
    needs: str | None
    """The output modality the function reads from its source stage (None: not checked)."""
    targets: tuple[str, ...] | None
    """The stage kinds it can feed (None: any)."""
    all_positions: bool
    """It reads the hidden states of every position (prompt and generated), not only the prompt's."""


_REGISTRY: dict[str, _Registered] = {}


def register_stage_input(
    name: str,
    *,
    needs: str | None = None,
    targets: tuple[str, ...] | None = None,
    all_positions: bool = False,
) -> Callable[[StageInputFn], StageInputFn]:
    """Decorator: register ``fn(StageInput) -> prompt`` under ``name`` for ``OmniStageConfig.stage_input``.

    ``needs``: the modality the function reads from its source stage (checked against the source's
    ``output_modalities`` when a pipeline is built); ``targets``: the stage kinds it can feed;
    ``all_positions``: it reads the hidden states of every position (the source's ``ar`` stage then
    captures generated positions too: ``CompletionOutput.hidden_states``).
    """

    def register(fn: StageInputFn) -> StageInputFn:
        _REGISTRY[name] = _Registered(fn, needs, targets, all_positions)
        return fn

    return register


def reads_all_positions(stages: list[OmniStageConfig], stage: OmniStageConfig) -> bool:
    """Whether ``stage``'s input function reads every position's hidden states from its source."""
    return _registered(stage_input_of(stages, stage)).all_positions


def stage_input_names() -> list[str]:
    """Names of the registered stage-input functions."""
    return sorted(_REGISTRY)


def get_stage_input(name: str) -> StageInputFn:
    """The function registered under ``name`` (ValueError listing the registered names otherwise)."""
    return _registered(name).fn


def _registered(name: str) -> _Registered:
    if name not in _REGISTRY:
        raise ValueError(f"unknown stage_input {name!r}; registered: {stage_input_names()}")
    return _REGISTRY[name]


@register_stage_input("prompt")
def original_prompt(data: StageInput) -> Any:
    """The request's own prompt (the first stage's default)."""
    return data.prompt


@register_stage_input("text", needs="text")
def generated_text(data: StageInput) -> dict[str, str]:
    """The source AR stage's generated text as the prompt (prompt expansion, text-to-text)."""
    return {"prompt": data.source.outputs[0].text}


@register_stage_input("hidden_states", needs="hidden_states", targets=("dit",))
def prompt_hidden_states(data: StageInput) -> dict[str, Any]:
    """The source AR stage's prompt hidden states as a DiT's text conditioning (``prompt_embeds``)."""
    embeds = data.source.outputs[0].prompt_hidden_states
    if embeds is None:
        raise ValueError(f"stage {data.stage.source_stage} returned no prompt hidden states")
    return {"prompt_embeds": embeds}


@register_stage_input("image", needs="image")
def generated_image(data: StageInput) -> dict[str, Any]:
    """The source DiT stage's first image as the init image, with the request's text (image-to-image)."""
    return {"prompt": data.text or "", "image": data.source.images[0]}


@register_stage_input("latents", needs="latent", targets=("dit",))
def generated_latents(data: StageInput) -> dict[str, Any]:
    """The source DiT stage's latents to continue from (the stage's ``denoising_start`` says where), with the
    request's conditioning: its text or prompt tensors and its negative prompt."""
    latents = data.source.latents
    if latents is None:
        raise ValueError(f"stage {data.stage.source_stage} returned no latents")
    prompt = {"prompt": data.prompt} if isinstance(data.prompt, str) else data.prompt
    conditioning = {key: value for key, value in prompt.items() if key in CONDITIONING_KEYS}
    return {**conditioning, "latents": latents}


@register_stage_input("codes", needs="audio_codes", targets=("code2wav",))
def generated_codes(data: StageInput) -> dict[str, Any]:
    """The source AR stage's generated token ids as codec codes (a talker's reply), without the end token
    it stopped on; with the request's ``voice`` when its prompt names one."""
    completion = data.source.outputs[0]
    codes = list(completion.token_ids)
    ended_on_token = completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str)
    prompt = data.prompt if isinstance(data.prompt, dict) else {}
    voice = {"voice": prompt["voice"]} if "voice" in prompt else {}
    return {"codes": codes[:-1] if ended_on_token else codes, **voice}


@register_stage_input("chat_template")
def chat_template_ids(data: StageInput) -> dict[str, list[int]]:
    """The prompt text in the stage model's chat template, as token ids, the way a DiT with an LM text
    encoder (Z-Image, Qwen-Image) encodes it: a user turn, generation prompt, first 512 tokens kept."""
    source = tokenizer_source(data.stage)
    text = chat_prompt(*source, [{"role": "user", "content": data.text or ""}])
    return {"prompt_token_ids": _tokenizer(*source)(text)["input_ids"][:DIT_TEXT_MAX_TOKENS]}


def chat_prompt(model: str, revision: str | None, messages: list[dict[str, str]]) -> str:
    """``messages`` in the chat template of ``model``'s tokenizer (a folder, or a hub id at ``revision``),
    ready for the assistant's turn."""
    tokenizer = _tokenizer(model, revision)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


def tokenizer_source(stage: OmniStageConfig) -> tuple[str, str | None]:
    """``(model, revision)`` of an ``ar`` stage's tokenizer, as vLLM picks it: ``tokenizer`` else the
    model, ``tokenizer_revision`` else ``revision``."""
    args = stage.engine_args
    return args.get("tokenizer") or stage.model_path, args.get("tokenizer_revision") or args.get("revision")


@cache
def _tokenizer(model: str, revision: str | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, revision=revision)


def default_stage_input(stage: OmniStageConfig, source: OmniStageConfig | None) -> str:
    """The function a stage gets when its config names none, from its modalities and its source's."""
    if source is None:
        return "prompt"
    if "hidden_states" in stage.input_modalities:
        return "hidden_states"
    if "latent" in stage.input_modalities:
        return "latents"
    if "audio_codes" in stage.input_modalities:
        return "codes"
    if "image" in stage.input_modalities and "image" in source.output_modalities:
        return "image"
    return "text"


def stage_input_of(stages: list[OmniStageConfig], stage: OmniStageConfig) -> str:
    """The name of ``stage``'s stage-input function: its own, or the default for its modalities."""
    source = stages[stage.source_stage] if stage.source_stage is not None else None
    return stage.stage_input or default_stage_input(stage, source)


def check_pipeline(stages: list[OmniStageConfig]) -> None:
    """Stage ids are positions; each stage's input function exists, feeds its kind, and has a source stage
    that produces what it reads."""
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    for position, stage in enumerate(stages):
        where = f"stage {stage.stage_id}"
        if stage.stage_id != position:
            raise ValueError(f"{where}: stage_id must equal its position in the list ({position})")
        try:
            registered = _registered(stage_input_of(stages, stage))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if registered.targets is not None and stage.engine_type not in registered.targets:
            name = stage_input_of(stages, stage)
            raise ValueError(f"{where}: stage_input {name!r} feeds {list(registered.targets)} stages")
        if stage.source_stage is not None and registered.needs is not None:
            _check_source(stage, stages[stage.source_stage], registered.needs)


def _check_source(stage: OmniStageConfig, source: OmniStageConfig, needs: str) -> None:
    from vllm_omni.pipeline.kinds import get_stage_kind, stage_kind_names

    makers = [kind for kind in stage_kind_names() if needs in get_stage_kind(kind).output_modalities]
    if source.engine_type not in makers or needs not in source.output_modalities:
        kinds = " or ".join(repr(kind) for kind in makers)
        raise ValueError(
            f"stage {stage.stage_id}: input {stage.input_modalities} needs stage {source.stage_id} to be "
            f"an {kinds} stage with {needs!r} in output_modalities (or set stage_input)"
        )


# Model-specific functions register themselves here, once the registry above exists.
from vllm_omni.pipeline import qwen2_5_omni  # noqa: E402, F401
