"""mm_embedding through ``vllm.LLM`` on a real CPU engine with tiny LLaVA, against HF transformers."""

import re

import pytest
import torch
from vllm import SamplingParams

from tests.utils import image_request, random_image
from vllm_omni.multimodal.mm_embedding import MMEmbeddingItem, MMEmbeddingParams

pytestmark = pytest.mark.engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
ATOL = 1e-5


def params(**options) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=4, extra_args={"mm_embedding": options})


def test_config_flag_is_visible(llava_mm_llm, llava_llm):
    config = llava_mm_llm.llm_engine.vllm_config.model_config.multimodal_config
    assert config.enable_return_mm_embedding is True
    default = llava_llm.llm_engine.vllm_config.model_config.multimodal_config
    assert default.enable_return_mm_embedding is False


def test_values_equal_hf_get_image_features(llava_mm_llm, hf_reference):
    image = random_image(1)
    completion = llava_mm_llm.generate(image_request(image), GREEDY)[0].outputs[0]
    assert completion.mm_embedding.device.type == "cpu"
    assert completion.mm_embedding.dtype == torch.float32
    torch.testing.assert_close(completion.mm_embedding, hf_reference(image), atol=ATOL, rtol=0)
    assert completion.mm_embedding_items == [MMEmbeddingItem("image", 0, 0, 16)]
    assert "mm_embedding=Tensor(shape=(16, 64), dtype=torch.float32)" in repr(completion)


def test_several_images_of_different_sizes_mixed_with_text_only(llava_mm_llm, hf_reference):
    images = [random_image(2, 32, 32), random_image(3, 64, 48), random_image(4, 40, 90)]
    requests = [image_request(*images), "A text-only prompt", image_request(images[1])]
    outputs = llava_mm_llm.generate(requests, GREEDY)

    several = outputs[0].outputs[0]
    torch.testing.assert_close(several.mm_embedding, hf_reference(*images), atol=ATOL, rtol=0)
    assert [(i.index, i.offset, i.length) for i in several.mm_embedding_items] == [
        (0, 0, 16), (1, 16, 16), (2, 32, 16),
    ]  # fmt: skip
    assert outputs[1].outputs[0].mm_embedding is None
    assert outputs[1].outputs[0].mm_embedding_items is None
    torch.testing.assert_close(outputs[2].outputs[0].mm_embedding, hf_reference(images[1]), atol=ATOL, rtol=0)


def test_encoder_cache_hits_in_one_batch_and_across_calls(llava_mm_llm, hf_reference):
    assert llava_mm_llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    image = random_image(5)
    expected = hf_reference(image)
    first = llava_mm_llm.generate([image_request(image), image_request(image, text="Again.")], GREEDY)
    second = llava_mm_llm.generate([image_request(image)], GREEDY)  # same prompt: prefix-cache hit
    for output in [*first, *second]:
        torch.testing.assert_close(output.outputs[0].mm_embedding, expected, atol=ATOL, rtol=0)


def test_every_completion_of_n_gets_it(llava_mm_llm, hf_reference):
    image = random_image(6)
    sampling = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=4)
    completions = llava_mm_llm.generate(image_request(image), sampling)[0].outputs
    assert len(completions) == 3
    for completion in completions:
        torch.testing.assert_close(completion.mm_embedding, hf_reference(image), atol=ATOL, rtol=0)


def test_chat(llava_mm_llm, hf_reference):
    image = random_image(7)
    messages = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": image}, {"type": "text", "text": "What is it?"},
    ]}]  # fmt: skip
    completion = llava_mm_llm.chat(messages, GREEDY)[0].outputs[0]
    torch.testing.assert_close(completion.mm_embedding, hf_reference(image), atol=ATOL, rtol=0)


def test_per_request_options(llava_mm_llm, hf_reference):
    image = random_image(8)
    expected = hf_reference(image)
    request = image_request(image)
    opt_out, other_modality, half, bf16, mean, typed = llava_mm_llm.generate(
        [request] * 6,
        [
            params(enabled=False),
            params(modalities=["audio"]),
            params(dtype="float16"),
            params(dtype="bfloat16"),
            params(pooling="mean"),
            SamplingParams(max_tokens=4, extra_args=MMEmbeddingParams(modalities=("image",)).to_extra_args()),
        ],
    )
    assert opt_out.outputs[0].mm_embedding is None
    assert other_modality.outputs[0].mm_embedding is None
    assert half.outputs[0].mm_embedding.dtype == torch.float16
    torch.testing.assert_close(half.outputs[0].mm_embedding, expected.half(), atol=1e-3, rtol=1e-3)
    assert bf16.outputs[0].mm_embedding.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.outputs[0].mm_embedding.float(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(
        mean.outputs[0].mm_embedding, expected.mean(0, keepdim=True), atol=ATOL, rtol=0
    )
    assert mean.outputs[0].mm_embedding_items == [MMEmbeddingItem("image", 0, 0, 1)]
    torch.testing.assert_close(typed.outputs[0].mm_embedding, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "int8"}, "mm_embedding.dtype must be one of auto, float16, bfloat16, float32, got 'int8'"),
        ({"pooling": "max"}, "mm_embedding.pooling must be one of none, mean, got 'max'"),
        ({"modalities": "image"}, "mm_embedding.modalities must be a list of modality names"),
        ({"enabled": "yes"}, "mm_embedding.enabled must be true or false"),
        (
            {"colour": 1},
            "unknown mm_embedding option(s) colour; allowed: enabled, modalities, dtype, pooling",
        ),
    ],
)
def test_bad_options_are_clear_errors_and_the_engine_keeps_serving(llava_mm_llm, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llava_mm_llm.generate(image_request(random_image(9)), params(**options))
    assert (
        llava_mm_llm.generate(image_request(random_image(9)), GREEDY)[0].outputs[0].mm_embedding is not None
    )


def test_disabled_captures_nothing(llava_llm):
    from vllm_omni.patch.report import engine_report

    output = llava_llm.generate(image_request(random_image(10)), GREEDY)[0].outputs[0]
    assert output.mm_embedding is None and output.mm_embedding_items is None
    report = engine_report(llava_llm)
    assert report["engine_core"]["mm_embedding_requests"] is None  # vLLM's own scheduler: no collector
    assert report["workers"][0]["mm_embedding_requests"] is None  # no capturer: nothing captured
    assert llava_llm.llm_engine.vllm_config.scheduler_config.scheduler_cls is None
