"""Qwen2_5OmniTalkerForConditionalGeneration: Qwen2.5-Omni's talker (thinker states -> codec tokens) in vLLM.

Built from a Qwen2.5-Omni folder: ``talker_hf_config`` (the engine's ``hf_overrides``) makes the folder's
``talker_config`` the model config, and the weights are the folder's ``talker.*`` tensors. The decoder is
vLLM's ``Qwen2Model`` with M-RoPE (its layers' attention of the config's ``head_dim``); the codec embedding
is ``embedding_size`` wide (the thinker's width) and ``thinker_to_talker_proj`` maps every input row into
the decoder, as transformers' ``Qwen2_5OmniTalkerForConditionalGeneration.forward`` does.

What transformers passes as ``inputs_embeds`` (prompt) and ``thinker_reply_part`` (decode) arrives as
per-position input extras (``vllm_omni.model_executor.models.input_extras``), ``embedding_size + 1``
columns per position: the thinker-side row, then the weight (0 or 1) of the position's codec-token
embedding. The talker's input at a position is ``proj(codec_embed(token) * weight + thinker_row)``
(``qwen2_5_omni_talker_inputs`` builds the prompt ids and extras from the thinker's output and says which
weight goes where). Prompt positions are text positions on the three M-RoPE channels. The codec start
token is never sampled (transformers' ``suppress_tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2MLP, Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.transformers_utils.config import set_default_rope_theta

ARCHITECTURE = "Qwen2_5OmniTalkerForConditionalGeneration"


def talker_hf_config(config):
    """``hf_overrides`` of a talker engine on a Qwen2.5-Omni folder: the folder's ``talker_config`` (its
    vocabulary, layers and context length) is the model's config, with this model's architecture.

    vLLM also calls it on a bare probe config (to learn the model type): that one passes unchanged."""
    talker = getattr(config, "talker_config", None)
    if talker is None:
        return config
    talker.architectures = [ARCHITECTURE]
    return talker


class TalkerDecoderLayer(nn.Module):
    """vLLM's Qwen2 decoder layer with attention of the config's ``head_dim``: the 7B talker's (128) is not
    ``hidden_size / num_attention_heads`` (896 / 12), which vLLM's Qwen2 attention assumes. The attention is
    vLLM's Llama one, which reads ``head_dim`` from the config (biased q, k, v and unbiased o, as Qwen2's;
    M-RoPE from ``rope_parameters``); the MLP, norms and ``forward`` are Qwen2's."""

    forward = Qwen2DecoderLayer.forward

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        set_default_rope_theta(config, default_theta=1000000)
        self.self_attn = LlamaAttention(
            config=config, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
            quant_config=quant_config, bias=True, bias_o_proj=False, cache_config=cache_config,
            prefix=f"{prefix}.self_attn",
        )  # fmt: skip
        self.mlp = Qwen2MLP(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act, quant_config=quant_config, prefix=f"{prefix}.mlp",
        )  # fmt: skip
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Qwen2_5OmniTalkerForConditionalGeneration(nn.Module, SupportsMRoPE):
    """Codec-token decoder over the thinker's states; takes per-position input extras (see module doc)."""

    supports_input_extras = True
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"talker.": ""})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.input_extras_width = config.embedding_size + 1
        self.codec_bos_token = config.tts_codec_start_token_id
        self.thinker_to_talker_proj = nn.Linear(config.embedding_size, config.hidden_size)
        self.model = Qwen2Model(
            vllm_config=vllm_config,
            prefix=maybe_prefix(prefix, "model"),
            decoder_layer_type=TalkerDecoderLayer,
        )
        # The codec embedding has the thinker's width, not the decoder's.
        self.model.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.embedding_size, prefix=maybe_prefix(prefix, "model.embed_tokens")
        )
        self.codec_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "codec_head")
        )
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Codec-token embeddings (``embedding_size`` wide, before the projection)."""
        return self.model.embed_input_ids(input_ids)

    def talker_inputs(self, input_ids: torch.Tensor, input_extras: torch.Tensor | None) -> torch.Tensor:
        """The decoder's input rows: ``proj(codec_embed(ids) * weight + thinker_row)`` per token."""
        codec = self.embed_input_ids(input_ids)
        if input_extras is not None:
            thinker_rows, weight = input_extras[:, :-1], input_extras[:, -1:]
            codec = codec * weight + thinker_rows
        return self.thinker_to_talker_proj(codec)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        input_extras: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.talker_inputs(input_ids, input_extras)
        return self.model(None, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Codec logits; the codec start token is never sampled."""
        logits = self.logits_processor(self.codec_head, hidden_states)
        if logits is not None:
            logits[:, self.codec_bos_token] = float("-inf")
        return logits

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list
    ) -> tuple[torch.Tensor, int]:
        """Text positions (the same on the three M-RoPE channels) for the prompt; delta 0."""
        positions = torch.arange(len(input_tokens)).expand(3, -1)
        return positions, 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The folder's ``talker.*`` tensors (the thinker's and token2wav's are skipped)."""
        talker = ((name, tensor) for name, tensor in weights if name.startswith("talker."))
        return AutoWeightsLoader(self).load_weights(talker, mapper=self.hf_to_vllm_mapper)
