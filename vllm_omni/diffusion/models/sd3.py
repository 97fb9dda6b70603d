"""Stable Diffusion 3 (MMDiT; CLIP-L + CLIP-G + T5 text encoders; flow matching)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from vllm_omni.diffusion.models.base import DenoiseState, DiTFamily, denoise_rows
from vllm_omni.diffusion.request import DiffusionRequest


class SD3Family(DiTFamily):
    """Conditioning per text: ``(prompt_embeds (L, D), pooled (P,))``; guidance is on above 1."""

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    samplers = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
    blocks_attr = "transformer_blocks"
    compiled_block_lists = ("transformer_blocks",)
    embeds_keys = ("prompt_embeds", "pooled_prompt_embeds")

    @property
    def size_factor(self) -> int:
        return self.pipe.vae_scale_factor * self.transformer.config.patch_size

    @property
    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def max_size(self) -> int | None:
        """The position embedding covers ``pos_embed_max_size`` patches per side."""
        patches = self.transformer.config.pos_embed_max_size
        return None if patches is None else patches * self.size_factor

    def guidance_on(self, guidance_scale: float) -> bool:
        return guidance_scale > 1

    def encode(self, texts: list[str]) -> list[Any]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(texts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return [(embeds[i], pooled[i]) for i in range(len(texts))]

    def conditioning_from_embeds(self, tensors: list[Any], keys: list[str]) -> tuple[torch.Tensor, ...]:
        """``prompt_embeds`` ``(tokenizer_max_length + max_sequence_length, joint_attention_dim)`` (77 CLIP
        tokens padded to T5's width, then the T5 tokens) and ``pooled_prompt_embeds``
        ``(pooled_projection_dim,)``."""
        config = self.transformer.config
        seq_len = self.pipe.tokenizer_max_length + self.max_sequence_length
        embeds = self._checked(keys[0], tensors[0], (seq_len, config.joint_attention_dim))
        pooled = self._checked(keys[1], tensors[1], (config.pooled_projection_dim,))
        return embeds, pooled

    def embeds_of(self, conditioning: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return list(conditioning)

    def set_timesteps(self, sampler: Any, request: DiffusionRequest) -> torch.Tensor:
        kwargs = {}
        if sampler.config.get("use_dynamic_shifting", None):
            patch = self.transformer.config.patch_size
            seq_len = (request.height // self.pipe.vae_scale_factor // patch) * (
                request.width // self.pipe.vae_scale_factor // patch
            )
            kwargs["mu"] = calculate_shift(
                seq_len,
                sampler.config.get("base_image_seq_len", 256),
                sampler.config.get("max_image_seq_len", 4096),
                sampler.config.get("base_shift", 0.5),
                sampler.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(sampler, request.num_inference_steps, self.device, **kwargs)
        return timesteps

    def predict(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        rows = denoise_rows(states)
        out = self.transformer(
            hidden_states=torch.cat([s.latents for s, _, _ in rows]),
            timestep=torch.stack([s.timestep for s, _, _ in rows]),
            encoder_hidden_states=torch.stack([cond[0] for _, cond, _ in rows]),
            pooled_projections=torch.stack([cond[1] for _, cond, _ in rows]),
            return_dict=False,
        )[0]
        preds, row = [], 0
        for s in states:
            if s.uncond is None:
                preds.append(out[row : row + 1])
                row += 1
            else:
                text, uncond = out[row : row + 1], out[row + 1 : row + 2]
                preds.append(uncond + s.request.guidance_scale * (text - uncond))
                row += 2
        return preds
