"""mm_embedding under chunked prefill, preemption, aborts and errors: right values, nothing left over."""

import pytest
import torch
from vllm import SamplingParams

from tests.utils import image_request, num_preemptions, random_image, running_llm
from vllm_omni.patch.report import engine_report

pytestmark = pytest.mark.engine

ATOL = 1e-5


def assert_nothing_tracked(llm) -> None:
    report = engine_report(llm)
    assert report["engine_core"]["mm_embedding_requests"] == 0
    assert [worker["mm_embedding_requests"] for worker in report["workers"]] == [0]
    assert not llm.llm_engine.output_processor.request_states


@pytest.fixture(scope="module")
def constrained_llm(llava_path):
    """8 tokens per step (the 16 image tokens span several steps) and 5 KV blocks of 32 tokens
    (CPU needs multiples of 32) for 4 sequences of ~30 prompt tokens: decoding must preempt."""
    with running_llm(
        llava_path,
        dtype="float32",
        enable_return_mm_embedding=True,
        max_model_len=128,
        max_num_seqs=4,
        max_num_batched_tokens=8,
        block_size=32,
        num_gpu_blocks_override=5,
        disable_log_stats=False,
    ) as llm:
        yield llm


def test_chunked_prefill_and_preemption_keep_values_exact(constrained_llm, hf_reference):
    images = [random_image(20 + i, 32 + 8 * i, 32) for i in range(8)]
    requests = [image_request(image) for image in images]
    sampling = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = constrained_llm.generate(requests, sampling)
    assert num_preemptions(outputs) > 0, "the scenario did not preempt"
    for image, output in zip(images, outputs, strict=True):
        torch.testing.assert_close(output.outputs[0].mm_embedding, hf_reference(image), atol=ATOL, rtol=0)
        assert len(output.outputs[0].token_ids) == 24
    assert_nothing_tracked(constrained_llm)


def test_thousand_mixed_requests_with_aborts_leave_nothing_behind(llava_mm_llm, hf_reference):
    engine = llava_mm_llm.llm_engine
    images = [random_image(40 + i, 32 + 4 * i, 40) for i in range(8)]
    expected = [hf_reference(image) for image in images]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    submitted, aborted, finished = {}, set(), {}
    for i in range(1000):
        request_id = f"mix-{i}"
        image_index = i % len(images) if i % 3 else None  # two thirds multimodal
        prompt = "text only" if image_index is None else image_request(images[image_index])
        engine.add_request(request_id, prompt, params)
        submitted[request_id] = image_index
        if i % 7 == 3:  # abort some right away, some after they started running
            engine.abort_request([request_id])
            aborted.add(request_id)
        if i % 10 == 9:
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
            if i % 50 == 49 and (victims := [r for r in submitted if r not in finished][-2:]):
                engine.abort_request(victims)
                aborted.update(victims)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output

    completed = [r for r in finished if r not in aborted]
    assert len(completed) > 600
    for request_id in completed:
        image_index, completion = submitted[request_id], finished[request_id].outputs[0]
        if image_index is None:
            assert completion.mm_embedding is None
        else:
            torch.testing.assert_close(completion.mm_embedding, expected[image_index], atol=ATOL, rtol=0)
    assert_nothing_tracked(llava_mm_llm)
