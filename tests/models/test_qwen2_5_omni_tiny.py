"""The tiny Qwen2.5-Omni (``vllm_omni.testing.tiny_qwen2_5_omni``): transformers runs all three parts (text,
and speech in either voice of ``spk_dict.pt``); vLLM's thinker generates transformers' greedy thinker tokens
for text, image and audio prompts (float32), offline and served by hub id (image_url and input_audio parts)
(``vllm serve Qwen/Qwen2.5-Omni-7B --omni`` on an offline HF_HOME holding the tiny checkpoint under that id).
"""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile
import torch
from vllm import SamplingParams

from tests.models.test_differential import MAX_TOKENS, hf_greedy
from tests.utils import random_image, running_llm, running_server
from vllm_omni.testing.hf_cache import add_to_hf_cache, use_offline_hf_home
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.testing.tiny_qwen2_5_omni import VOICES, build_qwen2_5_omni

MODEL_ID = "Qwen/Qwen2.5-Omni-7B"
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SAMPLES_PER_CODE = 2 * 240  # the DiT's 2 mel frames per code, BigVGAN's 240 samples per frame
IMAGE, AUDIO = random_image(seed=0), np.random.RandomState(0).uniform(-0.5, 0.5, 16000).astype(np.float32)


def user(text: str, *media: dict) -> list[dict]:
    """A chat of one user turn: the media parts, then the text."""
    return [{"role": "user", "content": [*media, {"type": "text", "text": text}]}]


CHATS = {
    "text": user("What is the capital of France?"),
    "image": user("Describe the image.", {"type": "image"}),
    "audio": user("What is this sound?", {"type": "audio"}),
}
MEDIA = {"text": {}, "image": {"images": [IMAGE]}, "audio": {"audio": [AUDIO]}}
VLLM_MEDIA = {"text": {}, "image": {"image": IMAGE}, "audio": {"audio": (AUDIO, 16000)}}


@pytest.fixture(scope="module")
def path() -> str:
    return tiny_model_path("qwen2_5_omni")


@pytest.fixture(scope="module")
def hf(path):
    """transformers' whole model (thinker, talker, token2wav; voices loaded) and processor, float32."""
    from safetensors import safe_open
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    # Its from_pretrained loads spk_dict.pt and cannot return loading info: every weight must be in the file.
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with safe_open(Path(path) / "model.safetensors", "pt") as weights:
        assert set(weights.keys()) == set(model.state_dict())
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def prompts(hf) -> dict[str, str]:
    """Each chat rendered by the checkpoint's chat template."""
    processor = hf[1]
    return {
        name: processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        for name, chat in CHATS.items()
    }


@pytest.fixture(scope="module")
def hf_tokens(hf, prompts) -> dict[str, tuple[list[int], list[int]]]:
    """transformers' thinker, greedy: (prompt ids, generated ids) per chat."""
    model, processor = hf
    tokens = {}
    for name, prompt in prompts.items():
        inputs = processor(text=prompt, return_tensors="pt", **MEDIA[name])
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        tokens[name] = inputs.input_ids[0].tolist(), hf_greedy(model.thinker, inputs.input_ids, **extra)
    return tokens


@pytest.fixture(scope="module")
def vllm_outputs(path, prompts):
    """vLLM's thinker on the folder, float32: one RequestOutput per chat."""
    with running_llm(path, dtype="float32") as llm:
        requests = [{"prompt": prompts[name], "multi_modal_data": VLLM_MEDIA[name]} for name in CHATS]
        return dict(zip(CHATS, llm.generate(requests, GREEDY, use_tqdm=False), strict=True))


def test_builds_are_deterministic(tmp_path):
    digests = []
    for out in (tmp_path / "a", tmp_path / "b"):
        out.mkdir()
        build_qwen2_5_omni(out)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())})
    assert digests[0] == digests[1]
    assert {"model.safetensors", "spk_dict.pt", "tokenizer.json", "chat_template.jinja"} <= set(digests[0])


def test_token_ids_and_voices_agree_with_the_tokenizer(hf, path):
    model, processor = hf
    thinker, talker = model.config.thinker_config, model.config.talker_config
    ids = processor.tokenizer.convert_tokens_to_ids
    media = (processor.image_token, processor.audio_token, processor.video_token)
    assert [ids(t) for t in media] == [thinker.image_token_id, thinker.audio_token_id, thinker.video_token_id]
    assert [ids(t) for t in media] == [talker.image_token_id, talker.audio_token_id, talker.video_token_id]
    assert ids(processor.vision_bos_token) == thinker.vision_start_token_id == talker.vision_start_token_id
    assert ids(processor.audio_bos_token) == thinker.audio_start_token_id == talker.audio_start_token_id
    speakers = torch.load(Path(path) / "spk_dict.pt", weights_only=True)
    assert {voice: s["bos_token"] for voice, s in speakers.items()} == {v: ids(t) for v, t in VOICES.items()}


def test_transformers_speaks_in_both_voices(hf, prompts):
    model, processor = hf
    inputs = processor(text=prompts["text"], return_tensors="pt")
    waveforms = {}
    for voice in VOICES:
        torch.manual_seed(0)  # token2wav starts from noise
        text_ids, waveform = model.generate(
            **inputs, speaker=voice, thinker_max_new_tokens=4, thinker_do_sample=False,
            talker_max_new_tokens=8, talker_do_sample=False,
        )  # fmt: skip
        waveforms[voice] = waveform
    assert text_ids.shape[1] > inputs.input_ids.shape[1]
    for waveform in waveforms.values():
        assert waveform.dtype == torch.float32 and waveform.ndim == 1 and torch.isfinite(waveform).all()
        assert waveform.numel() > 0 and waveform.numel() % SAMPLES_PER_CODE == 0
        assert 0.01 < waveform.std() and waveform.abs().max() < 1  # audible, not clipped
    # The voice's ref_mel and cond reach the waveform.
    assert (waveforms["Chelsie"] - waveforms["Ethan"]).abs().max() > 0.01


@pytest.mark.engine
@pytest.mark.parametrize("name", list(CHATS))
def test_vllm_thinker_greedy_matches_transformers(vllm_outputs, hf_tokens, name):
    output = vllm_outputs[name]
    prompt_ids, generated = hf_tokens[name]
    assert output.prompt_token_ids == prompt_ids  # the same media placeholders, expanded the same way
    assert list(output.outputs[0].token_ids) == generated


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, path):
    """An offline HF_HOME holding the tiny checkpoint as Qwen/Qwen2.5-Omni-7B."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        add_to_hf_cache(use_offline_hf_home(monkeypatch, home), MODEL_ID, path)
        yield home


def chat(client: openai.OpenAI, messages: list[dict]):
    """Greedy, MAX_TOKENS tokens, as the offline GREEDY."""
    greedy = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **greedy)


@pytest.mark.engine
def test_vllm_serve_the_hub_id_answers_chat_as_offline(hf_home, vllm_outputs):
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="PNG")
    image_url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
    wav = io.BytesIO()
    soundfile.write(wav, AUDIO, 16000, format="WAV", subtype="FLOAT")  # float samples: decoded exactly
    audio = {"data": base64.b64encode(wav.getvalue()).decode(), "format": "wav"}
    chats = {
        "text": [{"role": "user", "content": "What is the capital of France?"}],  # plain string content
        "image": user("Describe the image.", {"type": "image_url", "image_url": {"url": image_url}}),
        "audio": user("What is this sound?", {"type": "input_audio", "input_audio": audio}),
    }
    with running_server(MODEL_ID, "--omni", "--dtype", "float32") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        served = {name: chat(client, messages) for name, messages in chats.items()}
    for name, response in served.items():
        offline = vllm_outputs[name]
        assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
        assert response.choices[0].message.content == offline.outputs[0].text
