"""The worker-side install: each GPUModelRunner method wrapped once for every capture, captures per engine."""

from types import SimpleNamespace

import pytest
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.worker import gpu_model_runner

from vllm_omni.patch.patches import PATCHES
from vllm_omni.v1.worker import request_captures
from vllm_omni.v1.worker.mm_embedding_capture import MMEmbeddingCapturer
from vllm_omni.v1.worker.prompt_hidden_states_capture import PromptHiddenStatesCapturer

RUNNER_WRAPS = next(p.wraps for p in PATCHES if p.apply.startswith(request_captures.__name__))


@pytest.mark.parametrize("target", RUNNER_WRAPS)
def test_each_runner_method_is_wrapped_once_around_vllms_own(target):
    wrapper = getattr(gpu_model_runner.GPUModelRunner, target.rpartition(".")[2])
    assert wrapper.__module__ == request_captures.__name__
    stock = [c.cell_contents for c in wrapper.__closure__ if callable(c.cell_contents)]
    assert [f.__module__ for f in stock if f.__name__ == wrapper.__name__] == [gpu_model_runner.__name__]


def test_a_runner_gets_one_capture_per_feature_on(llava_path):
    bare = SimpleNamespace()  # vLLM's unit tests build runners without a config: every feature off
    assert request_captures.captures(bare) == ()
    config = EngineArgs(
        model=llava_path, enable_return_mm_embedding=True, return_prompt_hidden_states=True
    ).create_engine_config()
    runner = SimpleNamespace(vllm_config=config)
    active = request_captures.captures(runner)
    assert [type(c) for c in active] == [MMEmbeddingCapturer, PromptHiddenStatesCapturer]
    assert request_captures.captures(runner) is active  # created once per runner
    assert request_captures.capture_of(runner, PromptHiddenStatesCapturer).aux_index is None  # layer -1
