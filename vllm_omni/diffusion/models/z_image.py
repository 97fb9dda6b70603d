"""Z-Image (single-stream DiT; a Qwen3 LM as text encoder, second-to-last hidden layer; flow matching)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.z_image.pipeline_z_image import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

from vllm_omni.diffusion.models.base import DenoiseState, DiTFamily, denoise_rows
from vllm_omni.diffusion.request import DiffusionRequest


class ZImageFamily(DiTFamily):
    """Conditioning per text: the LM's hidden states of its real tokens ``(L, D)``; guidance is on above 0.

    The transformer takes lists of latents and captions, so requests of any image size and caption length
    share a forward pass.
    """

    name = "z_image"
    pipeline_classes = ("ZImagePipeline", "ZImageImg2ImgPipeline")
    samplers = ("FlowMatchEulerDiscreteScheduler",)
    blocks_attr = "layers"
    compiled_block_lists = ("noise_refiner", "context_refiner", "layers")
    embeds_as_list = True
    warm_up_captions = ("", "warm up " * 24)  # 32 and 64 tokens padded: the blocks' masked graphs too

    @property
    def size_factor(self) -> int:
        return self.pipe.vae_scale_factor * 2

    @property
    def default_size(self) -> int:
        return 1024  # ZImagePipeline's default

    @property
    def warm_up_size(self) -> int:
        """4 x 4 patches: the blocks' graphs are generic in the token count from the first compile
        (``compiled_block_args``), so the smallest image warms up graphs that serve every size (at the
        1024 px default, the tiny model's warm-up took 11 min on 2 CPU cores)."""
        return 4 * self.size_factor

    def compiled_block_args(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``(x, attn_mask, freqs_cis, ...)`` with the sequence dimension dynamic: caption lengths and image
        sizes change the token count (in steps of 32) but not the graph. The mask stays None where the
        transformer passes none (rows of one length), so attention can take SDPA's flash kernel on CUDA;
        the graphs with and without a mask are both warmed up (``warm_up_captions``)."""
        x, attn_mask, freqs_cis, *rest = args
        freqs_cis = freqs_cis.contiguous()  # a slice of a longer rotary table, for captions
        for tensor in (x, attn_mask, freqs_cis):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
        return (x, attn_mask, freqs_cis, *rest), kwargs

    def guidance_on(self, guidance_scale: float) -> bool:
        return guidance_scale > 0

    def batch_key(self, request: DiffusionRequest) -> Any:
        return None

    def latent_dtype(self) -> torch.dtype:
        return torch.float32  # the pipeline keeps latents in float32 whatever the model dtype

    def num_latent_channels(self) -> int:
        return self.transformer.in_channels

    def encode(self, texts: list[str]) -> list[Any]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(texts),  # encode_prompt rewrites its list in place
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return list(embeds)

    def conditioning_from_embeds(self, tensors: list[Any], keys: list[str]) -> torch.Tensor:
        """``(L, H)``: ``hidden_states[-2]`` of the text encoder over the chat-templated prompt's real tokens
        (1 <= L <= max_sequence_length; H: the encoder's hidden size, the transformer's ``cap_feat_dim``)."""
        shape = (range(1, self.max_sequence_length + 1), self.transformer.config.cap_feat_dim)
        return self._checked(keys[0], tensors[0], shape)

    def embeds_of(self, conditioning: torch.Tensor) -> list[torch.Tensor]:
        return [conditioning]

    def set_timesteps(self, sampler: Any, request: DiffusionRequest) -> torch.Tensor:
        latent_h = 2 * (request.height // self.size_factor)
        latent_w = 2 * (request.width // self.size_factor)
        mu = calculate_shift(
            (latent_h // 2) * (latent_w // 2),
            sampler.config.get("base_image_seq_len", 256),
            sampler.config.get("max_image_seq_len", 4096),
            sampler.config.get("base_shift", 0.5),
            sampler.config.get("max_shift", 1.15),
        )
        sigmas = get_default_z_image_sigmas(request.num_inference_steps)
        steps = request.num_inference_steps
        timesteps, _ = retrieve_timesteps(sampler, steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def predict(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        rows = denoise_rows(states)
        latents = [s.latents[0].to(self.dtype).unsqueeze(1) for s, _, _ in rows]
        times = torch.stack([(1000 - s.timestep) / 1000 for s, _, _ in rows])
        out = self.transformer(latents, times, [caption for _, caption, _ in rows], return_dict=False)[0]
        preds, row = [], 0
        for s in states:
            pos = out[row].float()
            if s.uncond is None:
                pred, row = pos, row + 1
            else:
                pred, row = pos + s.request.guidance_scale * (pos - out[row + 1].float()), row + 2
            preds.append(-pred.squeeze(1).unsqueeze(0))
        return preds
