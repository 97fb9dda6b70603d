"""Two-stage pipeline: an AR stage (vLLM engine) writes the prompt of a DiT stage (text hand-off)."""

import numpy as np
import pytest
from PIL import Image
from vllm import SamplingParams

from vllm_omni import (
    OmniLLM,
    StageInput,
    create_ar_stage_config,
    create_dit_stage_config,
    register_stage_input,
)
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.request import DiffusionSamplingParams
from vllm_omni.entrypoints.omni_params import pipeline_params, route_end
from vllm_omni.pipeline.stage_input import tokenizer_source
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import create_diffusion_engine

pytestmark = pytest.mark.engine

DIT = dict(num_inference_steps=3, height=32, width=32)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def omni():
    ar = create_ar_stage_config(stage_id=0, model_path=tiny_model_path("qwen3"), input_modalities=["text"],
                                output_modalities=["text"], dtype="float32", max_model_len=256,
                                enforce_eager=True)  # fmt: skip
    dit = create_dit_stage_config(stage_id=1, model_path=tiny_model_path("sd3"), input_modalities=["text"],
                                  output_modalities=["image"], **DIT)  # fmt: skip
    pipeline = OmniLLM([ar, dit])
    yield pipeline
    pipeline.close()


def test_the_documented_form_returns_text_and_images(omni):
    outputs = omni.generate([{"prompt": "A beautiful landscape"}, {"prompt": "A beautiful landscape"}])
    assert len(outputs) == 2
    for out in outputs:
        assert out.error is None and isinstance(out.text, str) and isinstance(out.images[0], Image.Image)
        assert out.prompt == {"prompt": "A beautiful landscape"}
        assert out.text == out.stage_outputs[0].outputs[0].text
        assert out.stage_outputs[1].images is out.images


def test_a_request_wanting_text_only_ends_at_the_ar_stage(omni):
    text_only = omni.generate(["A red cube"] * 2, GREEDY, use_tqdm=False, modalities=["text"])
    both = omni.generate(["A red cube"], [GREEDY, {"seed": 0}], use_tqdm=False, modalities=["text", "image"])
    for out in text_only:
        assert out.error is None and out.stage_id == 0 and list(out.stage_outputs) == [0]
        assert out.images is None and out.text == both[0].text
    assert both[0].stage_id == 1 and len(both[0].images) == 1
    with pytest.raises(
        ValueError, match=r"modalities must be a non-empty list of \['image', 'text'\], got \['audio'\]"
    ):
        omni.generate(["x"], modalities=["audio"])


def test_route_end_is_the_stage_that_completes_the_wanted_outputs():
    thinker = create_ar_stage_config(0, tiny_model_path("qwen3"), ["text"], ["text", "hidden_states"])
    dit = create_dit_stage_config(1, tiny_model_path("z_image"), ["hidden_states"], ["image"])
    wanted = (None, ["text"], ["image"], ["image", "text"])
    assert [route_end([thinker, dit], m) for m in wanted] == [1, 0, 1, 1]
    (cut,), (whole,) = (pipeline_params([thinker, dit], None, 1, False, m) for m in (["text"], None))
    assert len(cut) == 1 and "prompt_hidden_states" not in (cut[0].extra_args or {})  # nobody reads them
    assert len(whole) == 2 and whole[0].extra_args["prompt_hidden_states"] is True
    text, image = pipeline_params([thinker, dit], None, 2, False, [["text"], ["image"]])  # one per prompt
    assert (len(text), len(image)) == (1, 2)
    with pytest.raises(ValueError, match="modalities has 1 entries for 2 prompts"):
        pipeline_params([thinker, dit], None, 2, False, [["text"]])


def test_the_reader_decides_which_hidden_states_and_defaults_fill_what_a_request_leaves_out():
    """A talker's hand-off reads every position's hidden states, so its source captures them all; a
    stage's ``default_params`` are what a request starts from."""
    import vllm_omni.pipeline.qwen2_5_omni  # noqa: F401  (registers qwen2_5_omni_talker)

    thinker = create_ar_stage_config(0, tiny_model_path("qwen3"), ["text"], ["text", "hidden_states"])
    talker = create_ar_stage_config(1, tiny_model_path("qwen3"), ["hidden_states"], ["audio_codes"],
                                    stage_input="qwen2_5_omni_talker")  # fmt: skip
    talker.default_params = {"top_k": 40, "max_tokens": 100}
    (params,) = pipeline_params([thinker, talker], [None, {"max_tokens": 7}], 1, False)
    assert params[0].extra_args == {"prompt_hidden_states": "all"}
    assert (params[1].top_k, params[1].max_tokens) == (40, 7)
    (given,) = pipeline_params([thinker, talker], [None, SamplingParams(max_tokens=3)], 1, False)
    assert (given[1].top_k, given[1].max_tokens) == (0, 3)  # a params object stands alone


def test_text_hand_off_equals_running_the_stages_by_hand(omni, qwen3_llm):
    prompts = ["The quick brown fox", {"prompt": "A beautiful landscape"}]
    dit_params = [DiffusionSamplingParams(seed=1, output_type="np"), {"seed": 2, "output_type": "np"}]
    outputs = omni.generate(prompts, [GREEDY, dit_params], use_tqdm=False)
    texts = [o.outputs[0].text for o in qwen3_llm.generate(prompts, GREEDY)]
    assert [o.text for o in outputs] == texts
    engine = create_diffusion_engine(tiny_model_path("sd3"), DiTConfig(**DIT))
    for i, (text, seed) in enumerate(zip(texts, (1, 2), strict=True)):
        engine.add_request(str(i), {"prompt": text}, DiffusionSamplingParams(seed=seed, output_type="np"))
    direct = {}
    while engine.has_unfinished_requests():
        direct.update({o.request_id: o for o in engine.step()})
    for i, out in enumerate(outputs):  # requests may reach the DiT stage apart: other batch, float32 noise
        assert np.abs(out.images - direct[str(i)].images).max() < 1e-5


@register_stage_input("test_summary_prompt")
def summary_prompt(data: StageInput) -> dict:
    """A user's own hand-off: the source's text inside a new prompt."""
    return {"prompt": f"Summary of ({data.text}): {data.source.outputs[0].text}"}


def test_text_to_text_through_a_registered_stage_input(qwen3_llm):
    qwen3 = tiny_model_path("qwen3")
    args = dict(dtype="float32", max_model_len=256, enforce_eager=True)
    first = create_ar_stage_config(0, qwen3, final_output=False, **args)
    second = create_ar_stage_config(1, qwen3, stage_input="test_summary_prompt", **args)
    omni = OmniLLM([first, second], keep_stage_outputs=True)  # stage 0's drafts are compared below
    sources = ["The quick brown fox", "A beautiful landscape"]
    try:
        outputs = omni.generate(sources, GREEDY, use_tqdm=False)
    finally:
        omni.close()
    drafts = [o.outputs[0].text for o in qwen3_llm.generate(sources, GREEDY)]
    prompts = [f"Summary of ({p}): {d}" for p, d in zip(sources, drafts, strict=True)]
    finals = [o.outputs[0].text for o in qwen3_llm.generate(prompts, GREEDY)]
    assert [o.stage_outputs[0].outputs[0].text for o in outputs] == drafts
    assert [o.stage_outputs[1].prompt for o in outputs] == prompts
    assert [o.text for o in outputs] == finals


def test_pipeline_errors_name_the_stage():
    qwen3, sd3 = tiny_model_path("qwen3"), tiny_model_path("sd3")
    with pytest.raises(ValueError, match=r"stage 0: engine_args has unknown key\(s\) \['max_len'\]"):
        create_ar_stage_config(0, qwen3, max_len=3)
    with pytest.raises(ValueError, match="stage 1: stage_id must equal its position in the list"):
        OmniLLM([create_dit_stage_config(1, sd3)])
    dit_first = [create_dit_stage_config(0, sd3), create_ar_stage_config(1, qwen3)]
    with pytest.raises(ValueError, match="stage 1: input \\['text'\\] needs stage 0 to be an 'ar' stage"):
        OmniLLM(dit_first)
    hidden = [create_ar_stage_config(0, qwen3), create_dit_stage_config(1, sd3, ["hidden_states"])]
    with pytest.raises(ValueError, match="with 'hidden_states' in output_modalities"):
        OmniLLM(hidden)
    with pytest.raises(ValueError, match="stage 1: unknown stage_input 'nope'; registered: "):
        OmniLLM([create_ar_stage_config(0, qwen3), create_dit_stage_config(1, sd3, stage_input="nope")])


def test_a_prompt_the_first_stage_refuses_fails_the_call_naming_the_stage(omni):
    too_long = {"prompt_token_ids": list(range(300))}  # max_model_len is 256
    with pytest.raises(ValueError, match=r"^stage 0 \(ar\): .*maximum context length is 256 tokens"):
        omni.generate([{"prompt": "fine"}, too_long], use_tqdm=False)
    assert omni.stage_stats(0)["unfinished"] == 0  # all or none: the good prompt did not run either
    assert omni.generate({"prompt": "fine"}, use_tqdm=False)[0].error is None


def test_stage_inputs_use_the_tokenizer_vllm_picks_for_the_stage():
    stage = create_ar_stage_config(0, "org/model", revision="v1")
    assert tokenizer_source(stage) == ("org/model", "v1")
    stage = create_ar_stage_config(
        0, "org/model", revision="v1", tokenizer="org/tok", tokenizer_revision="t2"
    )
    assert tokenizer_source(stage) == ("org/tok", "t2")
