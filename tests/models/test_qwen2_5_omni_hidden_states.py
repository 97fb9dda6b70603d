"""The tiny Qwen2.5-Omni thinker returns what the talker is conditioned on: the input embeddings (layer 0,
after the multimodal merge) and the last hidden states (-1, post-norm) of every position it was fed,
prompt and generated tokens, equal to transformers' ``thinker.generate(output_hidden_states=True,
return_dict_in_generate=True)`` (what ``Qwen2_5OmniForConditionalGeneration.generate`` hands its talker)
for text, image and audio prompts, greedy, float32.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from tests.models.test_qwen2_5_omni_tiny import CHATS, MEDIA, VLLM_MEDIA, hf, path, prompts  # noqa: F401
from tests.utils import running_llm

pytestmark = pytest.mark.engine

LAYERS = [0, -1]
NUM_TOKENS = 8
ALL_POSITIONS = SamplingParams(
    temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, extra_args={"prompt_hidden_states": "all"}
)
# float32; measured max |vLLM - transformers| (layer 0 / -1): text 0 / 7.2e-7, image 1.2e-7 / 2.6e-6,
# audio 0 / 7.2e-7 (vLLM's vision encoder and attention are other kernels).
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def hf_thinker(hf, prompts):  # noqa: F811
    """transformers' thinker, greedy: (generated ids, {layer: rows of every step concatenated}) per chat."""
    model, processor = hf
    results = {}
    for name, prompt in prompts.items():
        inputs = processor(text=prompt, return_tensors="pt", **MEDIA[name])
        with torch.no_grad():
            result = model.thinker.generate(
                **inputs, max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, do_sample=False,
                output_hidden_states=True, return_dict_in_generate=True,
            )  # fmt: skip
        generated = result.sequences[0, inputs.input_ids.shape[1] :].tolist()
        rows = {layer: torch.cat([step[layer][0] for step in result.hidden_states]) for layer in LAYERS}
        results[name] = generated, rows
    return results


@pytest.fixture(scope="module")
def vllm_outputs(path, prompts):  # noqa: F811
    with running_llm(
        path, dtype="float32", return_prompt_hidden_states=True, prompt_hidden_states_layer=LAYERS
    ) as llm:
        requests = [{"prompt": prompts[name], "multi_modal_data": VLLM_MEDIA[name]} for name in CHATS]
        return dict(zip(CHATS, llm.generate(requests, ALL_POSITIONS, use_tqdm=False), strict=True))


@pytest.mark.parametrize("name", list(CHATS))
def test_thinker_rows_of_every_position_equal_transformers(vllm_outputs, hf_thinker, name):
    output, (generated, expected) = vllm_outputs[name], hf_thinker[name]
    completion = output.outputs[0]
    assert list(completion.token_ids) == generated
    assert list(completion.hidden_states) == LAYERS
    num_rows = len(output.prompt_token_ids) + NUM_TOKENS - 1
    for layer in LAYERS:
        rows = completion.hidden_states[layer]
        assert rows.dtype == torch.float32 and rows.shape == expected[layer].shape == (num_rows, 64)
        difference = (rows - expected[layer]).abs().max().item()
        print(f"{name} layer {layer}: max |vLLM - transformers| = {difference:.2e}")
        torch.testing.assert_close(rows, expected[layer], atol=ATOL, rtol=RTOL)
