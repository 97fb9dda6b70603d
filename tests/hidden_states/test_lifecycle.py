"""Prompt hidden states under preemption and aborts: right values, sent once, nothing left over."""

import pytest
from vllm import SamplingParams

from tests.hidden_states.conftest import PROMPTS, assert_matches_hf, opted_in
from tests.utils import num_preemptions
from vllm_omni.patch.report import engine_report

pytestmark = pytest.mark.engine


def assert_nothing_tracked(llm) -> None:
    report = engine_report(llm)
    assert report["engine_core"]["prompt_hidden_states_requests"] == 0
    assert [worker["prompt_hidden_states_requests"] for worker in report["workers"]] == [0]
    assert not llm.llm_engine.output_processor.request_states


def test_preemption_keeps_values_exact(phs_llm, hf_qwen3):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[0][::-1]]
    outputs = phs_llm.generate(prompts, opted_in(max_tokens=100, ignore_eos=True))
    assert num_preemptions(outputs) > 0, "the scenario did not preempt"
    for output in outputs:
        assert_matches_hf(hf_qwen3, output, layer=-2)
        assert len(output.outputs[0].token_ids) == 100
    assert_nothing_tracked(phs_llm)


def test_aborts_during_and_after_prefill_leave_nothing_behind(phs_llm, hf_qwen3):
    engine = phs_llm.llm_engine
    long_decode = opted_in(max_tokens=50, ignore_eos=True)
    engine.add_request("mid-prefill", PROMPTS[0], long_decode)  # four 32-token chunks
    engine.add_request("decoding", PROMPTS[2], long_decode)
    engine.add_request("kept", PROMPTS[3], opted_in(max_tokens=8))
    engine.step()
    engine.abort_request(["mid-prefill"])
    outputs = {}
    for _ in range(6):
        outputs.update((o.request_id, o) for o in engine.step())
    assert outputs["decoding"].outputs[0].prompt_hidden_states is not None, "should be decoding by now"
    engine.abort_request(["decoding"])
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert_matches_hf(hf_qwen3, outputs["kept"], layer=-2)
    phs_llm.generate(["Hello, world!"], SamplingParams(max_tokens=1))  # one more step delivers the aborts
    assert_nothing_tracked(phs_llm)
