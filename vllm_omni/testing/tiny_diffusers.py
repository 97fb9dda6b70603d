"""Tiny random-weight diffusers folders of pipelines without a native family: they run through the diffusers
executor (``DiTConfig.executor="auto"`` picks it).

Same recipe as ``tiny_dit``: diffusers' and transformers' own classes at tiny size, seeded, float32, the
tokenizers built locally (``tiny_dit.clip_tokenizer`` / ``t5_tokenizer``). Registered in
``tiny_models.TINY_MODELS`` as:

- ``sd2``: ``StableDiffusionPipeline`` in the SD 2.1 style (UNet with linear projections, v-prediction,
  DDIM), image sides multiples of 8, default 32x32 (VAE factor 2);
- ``pixart_sigma``: ``PixArtSigmaPipeline`` (DPM-Solver++, learned sigma, T5); the pipeline bins sizes to
  its 256-pixel aspect-ratio table (transformer ``sample_size`` 32) and resizes back, VAE factor 8;
- ``flux``: ``FluxPipeline`` in the FLUX.1-dev style (guidance embedding, dynamic shifting, CLIP + T5),
  image sides multiples of 4 (VAE factor 2, 2x2 packed latents).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_omni.testing.tiny_dit import SEED, _vae, clip_tokenizer, t5_tokenizer

CLIP_DIM = 32
T5_DIM = 32


def _clip_text_model(tokenizer, with_projection: bool = False):
    """A 2-layer CLIP text encoder (hidden ``CLIP_DIM``) over ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM,
        projection_dim=CLIP_DIM, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5_encoder(tokenizer):
    """A 2-layer T5 v1.1 encoder (``d_model`` ``T5_DIM``) over ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=16, d_ff=2 * T5_DIM, num_layers=2, num_heads=2,
            feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip


def _sd_vae(blocks: int, scaling_factor: float):
    """A 4-channel AutoencoderKL (the SD/SDXL VAE's layout), ``blocks`` blocks: factor 2 ** (blocks - 1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8, 16, 16, 16)[:blocks],
        layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32,
        scaling_factor=scaling_factor,
    )  # fmt: skip


def build_sd2(out: Path) -> None:
    """StableDiffusionPipeline, SD 2.1 style: UNet (2 blocks, linear projections, heads of 16 and 32 wide)
    conditioned on a CLIP text encoder's last hidden states, v-prediction DDIM, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_DIM, attention_head_dim=(2, 4), use_linear_projection=True,
        norm_num_groups=16,
    )  # fmt: skip
    # SD 2.1's scheduler_config.json.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )  # fmt: skip
    StableDiffusionPipeline(
        vae=_sd_vae(blocks=2, scaling_factor=0.18215),
        text_encoder=_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out)


def build_pixart_sigma(out: Path) -> None:
    """PixArtSigmaPipeline: 2-layer PixArt transformer (2 heads of 16, learned sigma), T5 encoder, the SDXL
    VAE's layout with 4 blocks, DPM-Solver++ as PixArt-Sigma's own scheduler config."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=32, patch_size=2, caption_channels=T5_DIM,
        interpolation_scale=1, use_additional_conditions=False,
    )  # fmt: skip
    PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer),
        vae=_sd_vae(blocks=4, scaling_factor=0.13025),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    ).save_pretrained(out)


def build_flux(out: Path) -> None:
    """FluxPipeline, FLUX.1-dev style: 1 double-stream + 1 single-stream block (2 heads of 16), guidance
    embedding, CLIP (pooled) + T5 (sequence), the Flux VAE's layout at 2 blocks, dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    # FLUX.1-dev's scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    FluxPipeline(
        scheduler=scheduler,
        vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_model(clip_tok),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
    ).save_pretrained(out)
