"""A tiny random Qwen2.5-Omni: thinker (text + vision + audio encoders), talker, token2wav (DiT + BigVGAN),
its processor, chat template and a ``spk_dict.pt`` with two voices, built with ``transformers``' own classes.

Sizes follow the shared tiny text dimensions (hidden 64, 2 layers, head_dim 32: vLLM's CPU attention refuses
16). The token ids the model and the processor use are the tiny tokenizer's; the talker keeps the real
checkpoint's codec vocabulary (8448, codec pad/start/end/mask = 8292/8293/8294/8296), so the defaults of
``Qwen2_5OmniForConditionalGeneration.generate`` (talker EOS 8292, 8294) hold, and token2wav embeds every
code the talker can emit (``num_embeds`` = talker vocabulary - 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_omni.testing import tokenizer as tokenizer_module

SEED = 0
IMAGE_PATCH_SIZE = 8
# The image processor resizes to between 32x32 and 64x64 pixels: 4 to 16 image tokens (2x2 patches merged).
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 32 * 32, 64 * 64
# Tokens the processor and the chat template use, by the tokenizer attribute that names them.
NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
# The talker's text-side markers (thinker token ids it embeds) and one text-start token per voice: special
# tokens of the tokenizer, so that every id either model emits decodes.
TTS_PAD, TTS_TEXT_BOS, TTS_TEXT_EOD = "<|tts_pad|>", "<|tts_text_bos|>", "<|tts_text_eod|>"
VOICES = {"Chelsie": "<|tts_bos_chelsie|>", "Ethan": "<|tts_bos_ethan|>"}
REFERENCE_MEL_FRAMES = 30  # a voice's reference mel clip (the DiT's speaker encoder pools over its frames)
TEXT_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}  # 16 = head_dim / 2
TALKER_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 8, 8]}  # 24 = head_dim / 2
MEL_DIM = 80
SPEAKER_DIM = 32  # the DiT's enc_emb_dim: the size of a voice's "cond" vector

# Qwen2.5-Omni's chat format: ChatML, a default system turn, media parts as <bos><MEDIA><eos>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] in ('image', 'image_url') %}{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{% elif content['type'] in ('audio', 'audio_url', 'input_audio') %}"
    "{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% elif content['type'] in ('video', 'video_url') %}{{ '<|vision_bos|><|VIDEO|><|vision_eos|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_qwen2_5_omni(out: Path) -> None:
    """Qwen2_5OmniForConditionalGeneration + Qwen2_5OmniProcessor + spk_dict.pt (voices Chelsie, Ethan)."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    tok = build_omni_tokenizer()
    config = omni_config(tok)
    torch.manual_seed(SEED)
    model = Qwen2_5OmniForConditionalGeneration(config)
    audible_vocoder(model.token2wav.code2wav_bigvgan_model)
    model.save_pretrained(out)
    omni_processor(tok).save_pretrained(out)
    torch.save(speakers(tok), out / "spk_dict.pt")


def build_omni_tokenizer():
    """The shared tiny tokenizer with Qwen2.5-Omni's special tokens, the named ones as attributes."""
    from transformers import PreTrainedTokenizerFast

    extra = (*NAMED_TOKENS.values(), TTS_PAD, TTS_TEXT_BOS, TTS_TEXT_EOD, *VOICES.values())
    base = tokenizer_module.build_tokenizer(extra_special_tokens=extra)
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        eos_token=tokenizer_module.IM_END,
        pad_token=tokenizer_module.ENDOFTEXT,
        extra_special_tokens=NAMED_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )


def omni_config(tok):
    """Qwen2_5OmniConfig at tiny size, its token ids the tokenizer's."""
    from transformers import Qwen2_5OmniConfig

    ids = {name: tok.convert_tokens_to_ids(token) for name, token in NAMED_TOKENS.items()}
    media_ids = dict(
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
    )
    config = Qwen2_5OmniConfig(
        thinker_config=thinker_config(tok, media_ids),
        talker_config=talker_config(tok, media_ids),
        token2wav_config=token2wav_config(),
    )
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    return config


def thinker_config(tok, media_ids: dict[str, int]) -> dict:
    """The thinker: a 2-layer text model over a 2-block vision encoder (8-pixel patches) and a 2-layer
    audio encoder (128 mel bins, Whisper features)."""
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, rope_parameters=TEXT_ROPE,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=IMAGE_PATCH_SIZE,
        spatial_merge_size=2, temporal_patch_size=2, window_size=4 * IMAGE_PATCH_SIZE, out_hidden_size=64,
        fullatt_block_indexes=[1],
    )  # fmt: skip
    audio = dict(
        num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, d_model=64,
        output_dim=64,
    )  # fmt: skip
    user_token_id = tok.convert_tokens_to_ids(tok.tokenize("user")[0])
    return dict(
        text_config=text, vision_config=vision, audio_config=audio, user_token_id=user_token_id, **media_ids
    )


def talker_config(tok, media_ids: dict[str, int]) -> dict:
    """The talker: a 2-layer codec model over the thinker's hidden states (width 64; heads of 48, not 64 / 2,
    as the 7B talker's are 128, not 896 / 12)."""
    return dict(
        vocab_size=8448, embedding_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=48, max_position_embeddings=1024,
        rope_parameters=TALKER_ROPE, spatial_merge_size=2,
        tts_text_start_token_id=tok.convert_tokens_to_ids(TTS_TEXT_BOS),
        tts_text_end_token_id=tok.convert_tokens_to_ids(TTS_TEXT_EOD),
        tts_text_pad_token_id=tok.convert_tokens_to_ids(TTS_PAD),
        **media_ids,
    )  # fmt: skip


def token2wav_config() -> dict:
    """token2wav: a 2-layer DiT (codes -> 80-bin mel, 2 frames per code) and a BigVGAN with the real
    upsampling (240 samples per mel frame)."""
    dit = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32, emb_dim=32,
        num_embeds=8447, mel_dim=MEL_DIM, enc_emb_dim=SPEAKER_DIM, enc_dim=32,
        enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16, enc_se_channels=16,
        look_ahead_layers=[1], look_backward_layers=[0],
    )  # fmt: skip
    bigvgan = dict(mel_dim=MEL_DIM, upsample_initial_channel=64, resblock_kernel_sizes=[3],
                   resblock_dilation_sizes=[[1, 3, 5]])  # fmt: skip
    return dict(dit_config=dit, bigvgan_config=bigvgan)


def audible_vocoder(vocoder: torch.nn.Module) -> None:
    """Re-draw BigVGAN's convolutions at unit gain (std 1 / sqrt(fan-in)), its output layer at 0.03.

    The default init (std 0.02) shrinks the signal at each of its six upsampling layers, to waveforms of about
    1e-8 where a difference between two implementations would not show; these have a std near 0.1, unclipped.
    """
    for name, module in vocoder.named_modules():
        if isinstance(module, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0]
            gain = 0.03 if name == "conv_post" else 1.0
            torch.nn.init.normal_(module.weight, std=gain / fan_in**0.5)


def omni_processor(tok):
    """Qwen2_5OmniProcessor: Qwen2-VL image and video processors (8-pixel patches), Whisper features."""
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    patches = dict(patch_size=IMAGE_PATCH_SIZE, temporal_patch_size=2, merge_size=2)
    size = {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **patches),
        video_processor=Qwen2VLVideoProcessor(size=size, **patches),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )


def speakers(tok) -> dict[str, dict]:
    """``spk_dict.pt``'s content: per voice, the talker's text-start token id (``bos_token``), the DiT's
    speaker vector (``cond``, (1, enc_emb_dim)) and reference mel frames (``ref_mel``, (1, frames, mel))."""
    generator = torch.Generator().manual_seed(SEED)
    return {
        voice: {
            "bos_token": tok.convert_tokens_to_ids(token),
            "cond": torch.randn(1, SPEAKER_DIM, generator=generator),
            "ref_mel": torch.randn(1, REFERENCE_MEL_FRAMES, MEL_DIM, generator=generator),
        }
        for voice, token in VOICES.items()
    }
