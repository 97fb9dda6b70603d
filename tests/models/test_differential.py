"""vLLM's greedy tokens equal HF transformers' greedy tokens on the tiny checkpoints (float32)."""

import pytest
import torch
from vllm import SamplingParams

from tests.utils import random_image

pytestmark = pytest.mark.engine

MAX_TOKENS = 12
PROMPTS = ["Hello, world!", "The quick brown fox", "A beautiful landscape with mountains"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def hf_greedy(model, input_ids: torch.Tensor, **inputs) -> list[int]:
    """Reference greedy decoding: full forward each step, argmax of the last position."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = model(input_ids=ids, **inputs).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, input_ids.shape[1] :].tolist()


def load_hf(cls, path):
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def test_qwen3_greedy_matches_transformers(qwen3_llm, qwen3_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_path)
    model = load_hf(AutoModelForCausalLM, qwen3_path)
    outputs = qwen3_llm.generate(PROMPTS, GREEDY)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert output.prompt_token_ids == input_ids[0].tolist()
        assert list(output.outputs[0].token_ids) == hf_greedy(model, input_ids)


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_llava_greedy_with_image_matches_transformers(llava_llm, llava_path, size):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(llava_path)
    model = load_hf(LlavaForConditionalGeneration, llava_path)
    image = random_image(seed=sum(size), width=size[0], height=size[1])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)

    output = llava_llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, GREEDY)[0]
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    assert output.prompt_token_ids == inputs.input_ids[0].tolist()
    expected = hf_greedy(model, inputs.input_ids, pixel_values=inputs.pixel_values)
    assert list(output.outputs[0].token_ids) == expected
