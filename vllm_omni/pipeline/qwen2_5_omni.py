"""Qwen2.5-Omni's hand-off from the thinker to the talker (stage-input function ``qwen2_5_omni_talker``).

The thinker stage (an ``ar`` stage on the Qwen2.5-Omni folder, ``prompt_hidden_states_layer=[0, -1]``,
``extra_args={"prompt_hidden_states": "all"}``) finishes a request with its prompt ids, generated ids and
``CompletionOutput.hidden_states`` (layers 0 and -1 of every fed position). This function turns them into
the talker stage's prompt: codec prompt ids, the prompt's ``cache_salt`` and the per-position input extras
(``TalkerInputBuilder``, from the talker stage's folder), which the ``ar`` stage moves into the request's
``SamplingParams``. The voice is the original prompt's ``voice`` (default ``Chelsie``, transformers'
default); an unknown voice is a ValueError naming ``voice`` and the folder's voices. A prompt with
``reply_in_prompt`` speaks a given text (``REPLY_IN_PROMPT``).
"""

from __future__ import annotations

from typing import Any

from vllm_omni.model_executor.models.input_extras import INPUT_EXTRAS_KEY
from vllm_omni.model_executor.models.qwen2_5_omni_talker_inputs import TalkerInputBuilder
from vllm_omni.pipeline.stage_input import StageInput, register_stage_input

DEFAULT_VOICE = "Chelsie"
REPLY_IN_PROMPT = "reply_in_prompt"
"""A prompt key: the prompt's last N tokens are a reply given to be spoken (``/v1/audio/speech``), which the
talker reads as if the thinker had generated them; the thinker then generates one token, not spoken."""


@register_stage_input("qwen2_5_omni_talker", needs="hidden_states", targets=("ar",), all_positions=True)
def talker_input(data: StageInput) -> dict[str, Any]:
    """The talker request for the thinker's finished reply."""
    output = data.source
    completion = output.outputs[0]
    states = getattr(completion, "hidden_states", None)
    if not isinstance(states, dict):
        raise ValueError(
            f"stage {data.stage.source_stage} returned no hidden states: the talker needs layers 0 and -1 "
            "of every position (prompt_hidden_states_layer=[0, -1], prompt_hidden_states 'all')"
        )
    builder = TalkerInputBuilder.from_folder(data.stage.model_path)
    ids = [*output.prompt_token_ids, *completion.token_ids]
    reply_start = len(output.prompt_token_ids) - _reply_in_prompt(data.prompt, len(output.prompt_token_ids))
    request = builder.build(ids[:reply_start], ids[reply_start:], states, voice_of(data.prompt))
    return {**request.prompt, INPUT_EXTRAS_KEY: request.input_extras}


def voice_of(prompt: Any) -> str:
    """The request's voice: its prompt dict's ``voice``, else ``DEFAULT_VOICE``."""
    return _prompt_dict(prompt).get("voice", DEFAULT_VOICE)


def _reply_in_prompt(prompt: Any, num_prompt: int) -> int:
    reply = _prompt_dict(prompt).get(REPLY_IN_PROMPT, 0)
    if not isinstance(reply, int) or isinstance(reply, bool) or not 0 <= reply < num_prompt:
        raise ValueError(f"{REPLY_IN_PROMPT} must be an integer in [0, {num_prompt}), got {reply!r}")
    return reply


def _prompt_dict(prompt: Any) -> dict[str, Any]:
    return prompt if isinstance(prompt, dict) else {}
