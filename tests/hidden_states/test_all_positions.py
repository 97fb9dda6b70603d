"""Several layers and every position (``prompt_hidden_states_layer=[0, -1]``, ``"all"``) on tiny qwen3.

32 tokens per step (chunked prefill) and 8 usable KV blocks of 32 tokens for up to 4 sequences: long
decodes side by side preempt. A request's rows equal transformers' hidden states of its prompt and its
generated tokens but the last (one forward pass over them), alone, in a mixed batch and after preemption.
"""

import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from tests.hidden_states.conftest import ATOL, PREEMPTING, PROMPTS, RTOL
from tests.utils import num_preemptions, running_llm
from vllm_omni.patch.report import engine_report

pytestmark = pytest.mark.engine

LAYERS = [0, -1]


def asking(mode, **kwargs) -> SamplingParams:
    """Greedy params of a request asking ``extra_args={"prompt_hidden_states": mode}``."""
    return SamplingParams(
        **{"temperature": 0.0, "max_tokens": 6, "ignore_eos": True, **kwargs},
        extra_args={"prompt_hidden_states": mode},
    )


@pytest.fixture(scope="module")
def layers_llm(qwen3_path):
    with running_llm(qwen3_path, prompt_hidden_states_layer=LAYERS, **PREEMPTING) as llm:
        yield llm


def fed_tokens(output) -> list[int]:
    """The tokens the model was fed: the prompt, then every generated token but the last."""
    return output.prompt_token_ids + list(output.outputs[0].token_ids)[:-1]


def assert_rows_match_hf(hf, output, token_ids: list[int], layers=LAYERS) -> float:
    """``hidden_states`` holds one row per token of ``token_ids`` per layer, as transformers computes
    them; returns the max abs difference."""
    hidden_states = output.outputs[0].hidden_states
    assert hidden_states is not None and list(hidden_states) == list(layers)
    assert output.outputs[0].prompt_hidden_states is None
    worst = 0.0
    for layer, rows in hidden_states.items():
        expected = hf(token_ids, layer)
        assert (
            rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.shape == (len(token_ids), 64)
        )
        torch.testing.assert_close(rows, expected, atol=ATOL, rtol=RTOL)
        worst = max(worst, (rows - expected).abs().max().item())
    return worst


def assert_nothing_held(llm) -> None:
    report = engine_report(llm)
    assert report["engine_core"]["hidden_states_requests"] == 0
    assert report["engine_core"]["prompt_hidden_states_requests"] == 0
    assert [worker["prompt_hidden_states_requests"] for worker in report["workers"]] == [0]
    assert not llm.llm_engine.output_processor.request_states


def test_every_fed_position_alone_and_in_a_mixed_chunked_batch(layers_llm, hf_qwen3):
    (alone,) = layers_llm.generate([PROMPTS[0]], asking("all", max_tokens=12))
    assert len(alone.prompt_token_ids) > 3 * 32, "the prompt should span several chunks"
    rows = alone.outputs[0].hidden_states
    assert rows[0].shape[0] == len(alone.prompt_token_ids) + 12 - 1
    print(f"alone: max |vLLM - HF| = {assert_rows_match_hf(hf_qwen3, alone, fed_tokens(alone)):.2e}")
    params = [asking("all", max_tokens=12), asking(True), SamplingParams(max_tokens=4), asking("all")]
    mixed = layers_llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], params)
    assert mixed[0].outputs[0].token_ids == alone.outputs[0].token_ids
    for layer in LAYERS:
        torch.testing.assert_close(
            mixed[0].outputs[0].hidden_states[layer], rows[layer], atol=ATOL, rtol=RTOL
        )
    assert_rows_match_hf(hf_qwen3, mixed[3], fed_tokens(mixed[3]))
    assert_rows_match_hf(hf_qwen3, mixed[1], mixed[1].prompt_token_ids)  # True: the prompt's rows
    assert mixed[2].outputs[0].hidden_states is None and mixed[2].outputs[0].prompt_hidden_states is None
    assert_nothing_held(layers_llm)


def test_preemption_recomputes_the_same_rows(layers_llm, hf_qwen3):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[0][::-1]]
    (alone,) = layers_llm.generate([prompts[1]], asking("all", max_tokens=100))
    outputs = layers_llm.generate(prompts, asking("all", max_tokens=100))
    assert num_preemptions(outputs) > 0, "the scenario did not preempt"
    worst = max(assert_rows_match_hf(hf_qwen3, output, fed_tokens(output)) for output in outputs)
    print(f"preempted batch: max |vLLM - HF| = {worst:.2e}")
    assert outputs[1].outputs[0].token_ids == alone.outputs[0].token_ids
    for layer in LAYERS:
        preempted, single = outputs[1].outputs[0].hidden_states[layer], alone.outputs[0].hidden_states[layer]
        torch.testing.assert_close(preempted, single, atol=ATOL, rtol=RTOL)
    assert_nothing_held(layers_llm)


def test_delta_stream_carries_them_once_in_the_final_output(layers_llm, hf_qwen3):
    engine = layers_llm.llm_engine
    engine.add_request("delta", PROMPTS[2], asking("all", output_kind=RequestOutputKind.DELTA))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == "delta"]
    carrying = [o for o in outputs if o.outputs[0].hidden_states is not None]
    assert len(outputs) > 1 and carrying == [outputs[-1]] and outputs[-1].finished
    token_ids = outputs[0].prompt_token_ids + [t for o in outputs for t in o.outputs[0].token_ids][:-1]
    assert_rows_match_hf(hf_qwen3, outputs[-1], token_ids)


def test_aborts_while_decoding_and_mid_prefill_leave_nothing_behind(layers_llm, hf_qwen3):
    engine = layers_llm.llm_engine
    engine.add_request("mid-prefill", PROMPTS[0], asking("all", max_tokens=50))  # four 32-token chunks
    engine.add_request("decoding", PROMPTS[2], asking("all", max_tokens=50))
    engine.add_request("kept", PROMPTS[3], asking("all", max_tokens=8))
    engine.step()
    engine.abort_request(["mid-prefill"])
    outputs = {}
    for _ in range(6):
        outputs.update((o.request_id, o) for o in engine.step())
    assert len(outputs["decoding"].outputs[0].token_ids) > 1, "should be decoding by now"
    engine.abort_request(["decoding"])
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert_rows_match_hf(hf_qwen3, outputs["kept"], fed_tokens(outputs["kept"]))
    layers_llm.generate(["Hello, world!"], SamplingParams(max_tokens=1))  # one more step delivers the aborts
    assert_nothing_held(layers_llm)


def test_one_configured_layer_and_all_positions(phs_llm, hf_qwen3):
    """An engine configured with one layer (-2, compiled, prefix caching on) answers "all" in the dict."""
    (output,) = phs_llm.generate([PROMPTS[3]], asking("all", max_tokens=5))
    assert_rows_match_hf(hf_qwen3, output, fed_tokens(output), layers=[-2])
