"""Qwen2.5-Omni's pipeline from its checkpoint folder: thinker -> talker -> code2wav.

One folder holds the three models (``config.json``: ``thinker_config``, ``talker_config``,
``token2wav_config``); each stage loads its part:

- **thinker** (``ar``, vLLM's own ``Qwen2_5OmniThinkerForConditionalGeneration``): text, image, audio and
  video in, text out (final); it also returns layers 0 and -1 of every position for requests that go on
  to the talker (``prompt_hidden_states_layer=[0, -1]``; the talker's hand-off asks for every position).
- **talker** (``ar``, ``Qwen2_5OmniTalkerForConditionalGeneration`` of this plugin through
  ``hf_overrides``): codec tokens from the thinker's states (``qwen2_5_omni_talker`` hand-off), sampled
  as transformers' ``generate`` samples them by default (``default_params``), not returned.
- **code2wav**: the codes' waveform, 24 kHz (final).

A request's ``voice`` (``Chelsie`` by default) is a key of its prompt dict; a request wanting only
``["text"]`` (``modalities``) ends at the thinker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_omni.config.stage import OmniStageConfig, create_ar_stage_config
from vllm_omni.model_executor.models.qwen2_5_omni_talker import talker_hf_config
from vllm_omni.model_executor.models.qwen2_5_omni_talker_inputs import TalkerInputBuilder

PARTS = ("thinker_config", "talker_config", "token2wav_config")
THINKER_LAYERS = [0, -1]
"""The thinker layers the talker reads: input embeddings and last hidden states."""


def is_qwen2_5_omni(config_file: Path) -> bool:
    """Whether a model's ``config.json`` describes a whole Qwen2.5-Omni (thinker, talker, token2wav)."""
    return all(part in json.loads(config_file.read_text()) for part in PARTS)


def qwen2_5_omni_stages(folder: str, **thinker_engine_args: Any) -> list[OmniStageConfig]:
    """The three stages of the Qwen2.5-Omni in ``folder``; ``thinker_engine_args``: the thinker's
    ``vllm.EngineArgs`` (e.g. ``max_model_len``; ``dtype`` and ``enforce_eager`` go to the talker too)."""
    shared = ("dtype", "enforce_eager")
    talker_args = {key: value for key, value in thinker_engine_args.items() if key in shared}
    thinker = create_ar_stage_config(
        0, folder, ["text"], ["text", "hidden_states"], return_prompt_hidden_states=True,
        prompt_hidden_states_layer=THINKER_LAYERS, **thinker_engine_args,
    )  # fmt: skip
    talker = create_ar_stage_config(
        1, folder, ["hidden_states"], ["audio_codes"], final_output=False, stage_input="qwen2_5_omni_talker",
        hf_overrides=talker_hf_config, skip_tokenizer_init=True, **talker_args,
    )  # fmt: skip
    talker.default_params = TalkerInputBuilder.from_folder(folder).sampling_fields()
    code2wav = OmniStageConfig(2, "code2wav", folder, ["audio_codes"], ["audio"])
    return [thinker, talker, code2wav]
