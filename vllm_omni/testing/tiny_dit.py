"""Tiny random-weight diffusers checkpoints of two DiT families: Stable Diffusion 3 and Z-Image.

Each builder writes a complete diffusers folder (``model_index.json`` and one subfolder per component) with
the real ``diffusers``/``transformers`` classes at tiny size, seeded, deterministic and float32, so tests run
real pipelines in seconds on CPU. Both VAEs have 2 blocks (scale factor 2) and both DiTs patch 2x2 latents:
image sides must be multiples of 4 (a 32x32 image is a 16x16x16 latent, 64 image tokens).

Registered in ``tiny_models.TINY_MODELS`` as ``"sd3"`` and ``"z_image"``.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from pathlib import Path

import torch

from vllm_omni.testing.tokenizer import CORPUS

SEED = 0
VAE_SCALE_FACTOR = 2
PATCH_SIZE = 2
LATENT_CHANNELS = 16
# The pipelines check height and width against this.
SIZE_MULTIPLE = VAE_SCALE_FACTOR * PATCH_SIZE

# SD3's two CLIP encoders differ in size (CLIP-L, OpenCLIP bigG); their hidden states, concatenated, are
# padded to T5's width and their projections concatenated into the pooled embedding.
SD3_CLIP_DIMS = (
    dict(hidden_size=32, intermediate_size=64, projection_dim=32),
    dict(hidden_size=64, intermediate_size=128, projection_dim=64),
)
SD3_T5_DIM = 128
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def clip_tokenizer():
    """CLIP's byte-level BPE (lower case, ``</w>`` word ends) trained on the shared tiny corpus.

    Like CLIP's vocabulary, every byte comes alone and as a word end (``"a"``, ``"a</w>"``), so no text is
    unknown. Listing the word ends up front also makes training deterministic: otherwise ``tokenizers``
    numbers them in hash-map order, which breaks ties between merges differently in every process.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    empty = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    word_ends = [char + "</w>" for char in sorted(pre_tokenizers.ByteLevel.alphabet())]
    trained = empty.train_new_from_iterator(
        [list(CORPUS)], vocab_size=1024, new_special_tokens=word_ends, show_progress=False
    )
    # Rebuilt from the BPE model alone: the word ends are ordinary tokens, not special ones.
    bpe = json.loads(trained.backend_tokenizer.to_str())["model"]
    merges = [tuple(merge) for merge in bpe["merges"]]
    return CLIPTokenizer(vocab=bpe["vocab"], merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """T5's Unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no sentinels) over the tiny corpus.

    Written out rather than trained (``tokenizers``' Unigram trainer is not deterministic): each corpus word
    is a piece scored by its frequency, and every printable ASCII character is a fallback piece.
    """
    from transformers import T5Tokenizer

    space = "\u2581"  # SentencePiece's word start
    words = Counter(space + word for line in CORPUS for word in re.findall(r"\w+", line))
    total = sum(words.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (space, -5.0)]
    vocab += [(word, math.log(n / total)) for word, n in sorted(words.items(), key=lambda w: (-w[1], w[0]))]
    vocab += [(char, -10.0) for char in sorted(set(string.printable) - set(string.whitespace))]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _vae(scaling_factor: float, shift_factor: float):
    """A 2-block AutoencoderKL in the SD3/Flux style: 16 latent channels, no quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_sd3(out: Path) -> None:
    """StableDiffusion3Pipeline: 2-layer SD3 MMDiT (2 heads of 32), two CLIPs with projection, T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip_configs = [
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
            **dims,
        )
        for dims in SD3_CLIP_DIMS
    ]
    t5_config = T5Config(
        vocab_size=len(t5_tok),
        d_model=SD3_T5_DIM,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3's T5-XXL
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    )
    torch.manual_seed(SEED)
    text_encoder, text_encoder_2 = (CLIPTextModelWithProjection(config) for config in clip_configs)
    text_encoder_3 = T5EncoderModel(t5_config)
    transformer = SD3Transformer2DModel(
        sample_size=32,  # latent side of the default 64x64 image
        patch_size=PATCH_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=SD3_T5_DIM,
        caption_projection_dim=64,  # the blocks need it equal to heads * head dim
        pooled_projection_dim=sum(dims["projection_dim"] for dims in SD3_CLIP_DIMS),
        pos_embed_max_size=32,  # up to 128x128 images
    )
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    ).save_pretrained(out)


def build_z_image(out: Path, text_encoder_model: str = "qwen3") -> None:
    """ZImagePipeline: 2-layer single-stream DiT; its text encoder is a tiny qwen3 LM without ``lm_head``.

    The text encoder and tokenizer are exactly those of ``tiny_model_path(text_encoder_model)``, so a vLLM
    engine serving that checkpoint computes the hidden states the pipeline conditions on
    (``hidden_states[-2]``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    from vllm_omni.testing.tiny_models import tiny_model_path

    qwen3 = tiny_model_path(text_encoder_model)
    text_encoder = Qwen3Model.from_pretrained(qwen3, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(qwen3)
    torch.manual_seed(SEED)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(PATCH_SIZE,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=64,
        n_layers=2,
        n_refiner_layers=2,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=text_encoder.config.hidden_size,
        axes_dims=(8, 12, 12),  # sums to the head dim, 32, like Z-Image's (32, 48, 48) to 128
        axes_lens=(1536, 512, 512),
    )
    ZImagePipeline(
        # Z-Image-Turbo's scheduler config.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
        ),
        vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),  # the Flux VAE's factors
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    ).save_pretrained(out)
