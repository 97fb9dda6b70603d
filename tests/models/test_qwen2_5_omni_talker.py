"""Qwen2.5-Omni's talker in vLLM (``Qwen2_5OmniTalkerForConditionalGeneration``, per-position input extras) on
the tiny checkpoint, float32: fed the thinker states transformers' ``generate`` computes, greedy vLLM emits
the codec tokens transformers' talker emits there (``talker_do_sample=False``), for text, image and audio
prompts; batched == alone; an aborted request's extras are freed; refused voices and replies.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from tests.models.test_qwen2_5_omni_tiny import CHATS, MEDIA
from tests.utils import running_llm
from vllm_omni.model_executor.models.input_extras import with_input_extras
from vllm_omni.model_executor.models.qwen2_5_omni_talker import talker_hf_config
from vllm_omni.model_executor.models.qwen2_5_omni_talker_inputs import TalkerInputBuilder
from vllm_omni.testing.tiny_models import tiny_model_path

VOICE = "Ethan"
THINKER_TOKENS, TALKER_TOKENS = 6, 24
GREEDY = {"temperature": 0.0, "max_tokens": TALKER_TOKENS}


@pytest.fixture(scope="module")
def path() -> str:
    return tiny_model_path("qwen2_5_omni")


@pytest.fixture(scope="module")
def builder(path) -> TalkerInputBuilder:
    return TalkerInputBuilder.from_folder(path)


@pytest.fixture(scope="module")
def hf_runs(path) -> dict[str, dict]:
    """Per chat, transformers' whole ``generate`` (greedy thinker and talker): the thinker's ids and states
    as the thinker stage hands them on, and the codes its talker emitted."""
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    runs = {}
    for name, chat in CHATS.items():
        prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, return_tensors="pt", **MEDIA[name])
        results = record_generate(model, inputs)
        runs[name] = hand_off(results, inputs.input_ids.shape[1])
    return runs


def record_generate(model, inputs) -> dict:
    """Run ``generate``, keeping what its thinker and talker returned (their ``generate`` wrapped, called
    through). transformers 5.19's ``generate`` hands its talker the image's ``pixel_values`` (a video's
    ``pixel_values_videos``), which the talker's ``generate`` refuses (ValueError: not used by the model);
    the wrap leaves them out."""
    results = {}
    for part in ("thinker", "talker"):
        stock = getattr(model, part).generate

        def recording(*args, _part=part, _stock=stock, **kwargs):
            if _part == "talker":
                kwargs.pop("pixel_values", None)
                kwargs.pop("pixel_values_videos", None)
            results[_part] = _stock(*args, **kwargs)
            return results[_part]

        getattr(model, part).generate = recording
    torch.manual_seed(0)
    model.generate(
        **inputs, speaker=VOICE, thinker_max_new_tokens=THINKER_TOKENS, thinker_do_sample=False,
        talker_max_new_tokens=TALKER_TOKENS, talker_do_sample=False,
    )  # fmt: skip
    for part in ("thinker", "talker"):
        del getattr(model, part).generate
    return results


def hand_off(results: dict, num_prompt: int) -> dict:
    """The thinker stage's layout: prompt ids, generated ids, ``{0: embeddings, -1: last hidden}`` with one
    row per prompt position and per generated token fed back; the talker's codes up to its first stop."""
    thinker = results["thinker"]
    ids = thinker.sequences[0].tolist()
    states = {key: torch.cat([step[key][0] for step in thinker.hidden_states]) for key in (0, -1)}
    codes = results["talker"][0, num_prompt + 2 :].tolist()
    stops = [i for i, code in enumerate(codes) if code in (8292, 8294)]
    return {
        "prompt_ids": ids[:num_prompt],
        "output_ids": ids[num_prompt:],
        "states": states,
        "codes": codes[: stops[0] + 1] if stops else codes,
    }


@pytest.fixture(scope="module")
def talker_llm(path):
    with running_llm(path, hf_overrides=talker_hf_config, dtype="float32", skip_tokenizer_init=True) as llm:
        yield llm


def talker_request(builder, run: dict, **overrides) -> tuple[dict, SamplingParams]:
    """The vLLM prompt and greedy sampling params of the talker request for ``run``'s thinker reply."""
    request = builder.build(run["prompt_ids"], run["output_ids"], run["states"], VOICE)
    params = builder.sampling_params(**{**GREEDY, **overrides})
    return request.prompt, with_input_extras(params, request.input_extras)


def generate(llm, builder, runs: list[dict]) -> list[list[int]]:
    prompts, params = zip(*(talker_request(builder, run) for run in runs), strict=True)
    outputs = llm.generate(list(prompts), list(params), use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


@pytest.mark.engine
@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_codes_are_transformers_talkers(talker_llm, builder, hf_runs, name):
    (codes,) = generate(talker_llm, builder, [hf_runs[name]])
    assert codes == hf_runs[name]["codes"]


@pytest.mark.engine
def test_batched_codes_equal_alone(talker_llm, builder, hf_runs):
    runs = [hf_runs[name] for name in CHATS] * 2
    batched = generate(talker_llm, builder, runs)
    assert batched == [run["codes"] for run in runs]


@pytest.mark.engine
def test_aborted_request_frees_its_extras(talker_llm, builder, hf_runs):
    engine = talker_llm.llm_engine
    prompt, params = talker_request(builder, hf_runs["text"])
    engine.add_request("aborted", prompt, params)
    engine.add_request("finished", *talker_request(builder, hf_runs["text"], max_tokens=2))
    for _ in range(3):
        engine.step()
    assert engine_report_extras(talker_llm) == 1  # "finished" ended after 2 codes, "aborted" runs
    engine.abort_request(["aborted"])
    talker_llm.generate([prompt], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    assert engine_report_extras(talker_llm) == 0


def engine_report_extras(llm) -> int:
    (worker,) = llm.collective_rpc("omni_patch_report")
    return worker["input_extras_requests"]


def test_unknown_voice_and_short_reply_are_refused(builder, hf_runs):
    run = hf_runs["text"]
    with pytest.raises(ValueError, match=r"voice must be one of \['Chelsie', 'Ethan'\], got 'Nobody'"):
        builder.build(run["prompt_ids"], run["output_ids"], run["states"], "Nobody")
    num_rows = len(run["prompt_ids"])
    short = {key: rows[:num_rows] for key, rows in run["states"].items()}
    with pytest.raises(ValueError, match="at least 2 tokens"):
        builder.build(run["prompt_ids"], run["output_ids"][:1], short, VOICE)


def test_extras_cross_vllms_msgpack_unchanged(builder, hf_runs):
    """The frontend -> EngineCore path: SamplingParams through vLLM's own encoder and decoder."""
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_omni.model_executor.models.input_extras import INPUT_EXTRAS_KEY, read_input_extras

    run = hf_runs["audio"]
    request = builder.build(run["prompt_ids"], run["output_ids"], run["states"], VOICE)
    params = with_input_extras(builder.sampling_params(), request.input_extras)
    decoded = MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(params))
    extras = read_input_extras(decoded.extra_args[INPUT_EXTRAS_KEY])
    assert torch.equal(extras, request.input_extras)
