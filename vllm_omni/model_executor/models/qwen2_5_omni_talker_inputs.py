"""The talker request of one Qwen2.5-Omni reply: codec prompt ids and per-position input extras.

From the thinker's prompt ids, generated ids and states (``{0: input embeddings, -1: last hidden
states}``, one row per prompt position then per generated token fed back: ``num_prompt + num_output - 1``
rows), this builds what transformers' ``Qwen2_5OmniForConditionalGeneration.generate`` hands its talker:

- prompt ids: the codec mask token on every thinker prompt position, then codec pad and codec bos;
- extras (``embedding_size + 1`` columns, ``Qwen2_5OmniTalkerForConditionalGeneration``'s layout): the
  thinker rows ``embed + hidden`` of the prompt (media placeholder embeddings zeroed), the voice's text-bos
  embedding, the first generated token's row, then one row per later generated token fed back, the
  text-eos embedding and the text-pad embedding (read for every later position); the last column is the
  weight of the codec embedding: 0 on every prompt position, 1 on every generated token.

The prompt's codec embeddings are left out as transformers 5's ``generate`` leaves them out: it does not
hand the talker's ``forward`` an attention mask, so the branch there that would add the codec pad and bos
embeddings to the last two prompt rows (and take M-RoPE positions from ``get_rope_index``) never runs;
its prompt positions are ``0..n-1`` on the three M-RoPE channels whatever the media, as here. The prompt
ids still matter: the repetition penalty counts them.

The thinker text-embedding rows (voice bos tokens, text eos, text pad) and the voices come from the
checkpoint folder (``thinker.model.embed_tokens.weight``, ``spk_dict.pt``), so a hand-off carries only the
thinker's states and ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from vllm_omni.transformers_utils.safetensors_files import files_holding

EMBED_WEIGHT = "thinker.model.embed_tokens.weight"
SAMPLING_DEFAULTS = {
    "temperature": 0.9, "top_k": 40, "top_p": 0.8, "repetition_penalty": 1.05, "max_tokens": 4096
}  # fmt: skip
"""The talker's sampling in transformers' ``generate`` (``talker_*`` defaults)."""


@dataclass(frozen=True)
class TalkerRequest:
    """One talker request: its prompt ids and its per-position input extras."""

    prompt_token_ids: list[int]
    input_extras: torch.Tensor

    @property
    def prompt(self) -> dict:
        """The vLLM prompt. Its ``cache_salt`` is a digest of the extras: every talker prompt has the same
        kind of ids (codec mask tokens), so without it prefix caching would share KV across replies."""
        digest = hashlib.sha256(self.input_extras.float().numpy().tobytes()).hexdigest()
        return {"prompt_token_ids": self.prompt_token_ids, "cache_salt": digest}


@dataclass(frozen=True)
class TalkerInputBuilder:
    """What the talker's inputs need from a Qwen2.5-Omni folder."""

    voices: dict[str, int]
    """Voice name -> its text-bos token id (``spk_dict.pt``'s ``bos_token``)."""
    text_rows: dict[int, torch.Tensor]
    """Thinker token id -> its input-embedding row (voices' bos ids, text eos, text pad)."""
    codec_mask: int
    codec_pad: int
    codec_bos: int
    codec_eos: int
    text_eos: int
    text_pad: int
    media_token_ids: tuple[int, ...]
    """The thinker's image, audio and video placeholder ids (their input embeddings are zeroed)."""

    @classmethod
    def from_folder(cls, path: str | Path) -> TalkerInputBuilder:
        return _builder(str(path))

    def check_voice(self, voice: str) -> None:
        """ValueError naming ``voice`` and the folder's voices when it is not one of them."""
        if voice not in self.voices:
            raise ValueError(f"voice must be one of {sorted(self.voices)}, got {voice!r}")

    def sampling_fields(self) -> dict:
        """The talker's ``SamplingParams`` fields: transformers' talker defaults (``SAMPLING_DEFAULTS``),
        stopping at codec pad or end (``generate``'s ``talker_eos_token_id``). The folder's
        ``generation_config.json`` is the thinker's: its EOS (a text token id) is ignored (``ignore_eos``),
        the codec stop ids are ``stop_token_ids``."""
        stop = [self.codec_pad, self.codec_eos]
        return {**SAMPLING_DEFAULTS, "stop_token_ids": stop, "ignore_eos": True, "detokenize": False}

    def sampling_params(self, **overrides):
        """The talker's ``SamplingParams`` (``sampling_fields``, ``overrides`` on top); a request's extras
        are added per request."""
        from vllm import SamplingParams

        return SamplingParams(**{**self.sampling_fields(), **overrides})

    def build(
        self,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        thinker_states: dict[int, torch.Tensor],
        voice: str,
    ) -> TalkerRequest:
        """The talker request for one thinker reply (see the module doc)."""
        self.check_voice(voice)
        num_prompt, num_output = len(prompt_token_ids), len(output_token_ids)
        if num_output < 2:
            raise ValueError(f"the talker needs a thinker reply of at least 2 tokens, got {num_output}")
        rows = _thinker_rows(thinker_states, num_prompt + num_output - 1)
        embeds = rows[0].clone()
        media = torch.isin(torch.tensor(prompt_token_ids), torch.tensor(self.media_token_ids))
        embeds[:num_prompt][media] = 0
        fed_back = embeds + rows[1]
        extras = torch.cat(
            [
                fed_back[:num_prompt],
                self.text_rows[self.voices[voice]][None],
                fed_back[num_prompt:],
                self.text_rows[self.text_eos][None],
                self.text_rows[self.text_pad][None],
            ]
        )
        ids = [self.codec_mask] * num_prompt + [self.codec_pad, self.codec_bos]
        weight = torch.ones(len(extras), 1, dtype=extras.dtype)
        weight[: len(ids)] = 0
        return TalkerRequest(ids, torch.cat([extras, weight], dim=1))


def _thinker_rows(states: dict[int, torch.Tensor], num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embeddings, last hidden states), checked: 2-D, ``num_rows`` rows, the same width."""
    if 0 not in states or -1 not in states:
        raise ValueError(f"thinker states need keys 0 and -1, got {sorted(states)}")
    embeds, hidden = states[0].float(), states[-1].float()
    for name, tensor in (("0", embeds), ("-1", hidden)):
        if tensor.ndim != 2 or tensor.shape[0] != num_rows or tensor.shape[1] != embeds.shape[1]:
            raise ValueError(
                f"thinker states[{name}] must be ({num_rows}, width): prompt + output - 1 rows, got "
                f"{tuple(tensor.shape)}"
            )
    return embeds, hidden


@cache
def _builder(path: str) -> TalkerInputBuilder:
    config = json.loads((Path(path) / "config.json").read_text())
    talker, thinker = config["talker_config"], config["thinker_config"]
    speakers = torch.load(Path(path) / "spk_dict.pt", weights_only=True)
    voices = {voice: int(speaker["bos_token"]) for voice, speaker in speakers.items()}
    text_ids = {*voices.values(), talker["tts_text_end_token_id"], talker["tts_text_pad_token_id"]}
    return TalkerInputBuilder(
        voices=voices,
        text_rows=_embedding_rows(Path(path), sorted(text_ids)),
        codec_mask=talker["tts_codec_mask_token_id"],
        codec_pad=talker["tts_codec_pad_token_id"],
        codec_bos=talker["tts_codec_start_token_id"],
        codec_eos=talker["tts_codec_end_token_id"],
        text_eos=talker["tts_text_end_token_id"],
        text_pad=talker["tts_text_pad_token_id"],
        media_token_ids=tuple(
            thinker[key] for key in ("image_token_index", "audio_token_index", "video_token_index")
        ),
    )


def _embedding_rows(folder: Path, token_ids: list[int]) -> dict[int, torch.Tensor]:
    """Rows of the thinker's input embedding, read from the (possibly sharded) safetensors, float32."""
    from safetensors import safe_open

    for file in files_holding(folder, EMBED_WEIGHT):
        with safe_open(file, "pt") as weights:
            if EMBED_WEIGHT in weights.keys():
                table = weights.get_slice(EMBED_WEIGHT)
                return {token_id: table[token_id : token_id + 1][0].float() for token_id in token_ids}
    raise ValueError(f"{folder} holds no {EMBED_WEIGHT}: not a Qwen2.5-Omni checkpoint")
