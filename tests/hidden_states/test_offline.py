"""Prompt hidden states through ``vllm.LLM`` (layer -2, compiled, chunked prefill) against transformers."""

import pytest
import torch
from vllm import SamplingParams
from vllm.config import CompilationMode
from vllm.sampling_params import RequestOutputKind

from tests.hidden_states.conftest import PROMPTS, assert_matches_hf, opted_in

pytestmark = pytest.mark.engine


def test_engine_settings_are_in_the_config(phs_llm):
    config = phs_llm.llm_engine.vllm_config
    assert config.additional_config["omni_prompt_hidden_states"] == {"layer": -2}
    assert config.compilation_config.mode != CompilationMode.NONE  # the compiled graph returns it
    assert config.cache_config.enable_prefix_caching


def test_chunked_mixed_batch_equals_hf_hidden_states_minus_2(phs_llm, hf_qwen3):
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    outputs = phs_llm.generate(list(PROMPTS), [opted_in(), plain, opted_in(), opted_in()])
    assert len(outputs[0].prompt_token_ids) > 3 * 32, "the prompt should span several chunks"
    for index in (0, 2, 3):
        assert_matches_hf(hf_qwen3, outputs[index], layer=-2)
        assert len(outputs[index].outputs[0].token_ids) == 4
    assert outputs[1].outputs[0].prompt_hidden_states is None
    completion = outputs[0].outputs[0]
    shape = (len(outputs[0].prompt_token_ids), 64)
    assert f"prompt_hidden_states=Tensor(shape={shape}, dtype=torch.float32)" in repr(completion)


def test_generated_tokens_are_unchanged_by_the_feature(phs_llm, qwen3_llm):
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    asked = opted_in(max_tokens=8, ignore_eos=True)
    ours = phs_llm.generate(list(PROMPTS), asked)
    stock = qwen3_llm.generate(list(PROMPTS), plain)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in stock]


def test_repeated_prompt_skips_prefix_cache_reads_and_gets_every_row(phs_llm, hf_qwen3):
    prompt = PROMPTS[0] + " Again."
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    phs_llm.generate([prompt], plain)  # fills the prefix cache
    (cached,) = phs_llm.generate([prompt], plain)
    assert cached.num_cached_tokens >= 32, "the scenario has no prefix-cache hit to skip"
    (asked,) = phs_llm.generate([prompt], opted_in())
    assert asked.num_cached_tokens == 0
    assert_matches_hf(hf_qwen3, asked, layer=-2)


def test_every_completion_of_n_gets_it(phs_llm, hf_qwen3):
    (output,) = phs_llm.generate([PROMPTS[0]], opted_in(n=2, temperature=1.0))
    assert len(output.outputs) == 2
    expected = hf_qwen3(output.prompt_token_ids, -2)
    for completion in output.outputs:
        torch.testing.assert_close(completion.prompt_hidden_states, expected, atol=1e-5, rtol=1e-5)


def test_delta_stream_carries_it_exactly_once(phs_llm, hf_qwen3):
    engine = phs_llm.llm_engine
    engine.add_request(
        "delta", PROMPTS[2], opted_in(max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    )
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == "delta"]
    carrying = [
        o.outputs[0].prompt_hidden_states for o in outputs if o.outputs[0].prompt_hidden_states is not None
    ]
    assert len(outputs) > 1 and len(carrying) == 1
    torch.testing.assert_close(carrying[0], hf_qwen3(outputs[0].prompt_token_ids, -2), atol=1e-5, rtol=1e-5)


def test_z_image_text_encoder_conditioning_is_reproduced(phs_llm):
    """Z-Image conditions on hidden_states[-2] of its Qwen3 text encoder (= the tiny qwen3 weights)."""
    from diffusers import ZImagePipeline

    from vllm_omni.testing.tiny_models import tiny_model_path

    pipe = ZImagePipeline.from_pretrained(tiny_model_path("z_image"), dtype=torch.float32)
    text = "A red fox in the snow"
    expected = pipe.encode_prompt(prompt=[text], device="cpu", do_classifier_free_guidance=False)[0][0]
    templated = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    token_ids = pipe.tokenizer(templated).input_ids
    (output,) = phs_llm.generate([{"prompt_token_ids": token_ids}], opted_in(max_tokens=1))
    torch.testing.assert_close(output.outputs[0].prompt_hidden_states, expected, atol=1e-5, rtol=1e-5)
