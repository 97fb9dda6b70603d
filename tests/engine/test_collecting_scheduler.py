"""The EngineCore scheduler of engines with per-request outputs: chosen through ``scheduler_cls``.

Engines without the features keep vLLM's scheduler; with one, ``OmniScheduler`` (or ``OmniAsyncScheduler``
under async scheduling, which the CPU platform turns off: here it is forced on the built config) runs
a real schedule/update cycle against a hand-made ``ModelRunnerOutput``, without starting an engine.
"""

import re
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.core.kv_cache_utils import KVCacheConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from vllm_omni.v1.core.sched.output_collectors import (
    OmniAsyncScheduler,
    OmniScheduler,
    OutputCollectingScheduler,
    use_collecting_scheduler,
)
from vllm_omni.v1.core.sched.prompt_hidden_states import PromptHiddenStatesCollector
from vllm_omni.v1.worker.runner_output import check_model_runner

PHS = {"return_prompt_hidden_states": True}
NUM_BLOCKS = 16


def scheduler_cls_of(model: str, **engine_args) -> str | None:
    return EngineArgs(model=model, **engine_args).create_engine_config().scheduler_config.scheduler_cls


class MyScheduler(OutputCollectingScheduler, AsyncScheduler):
    """A user's scheduler that mixes the collection in."""


def test_engines_without_the_features_keep_vllms_scheduler(qwen3_path, llava_path):
    assert scheduler_cls_of(qwen3_path) is None
    assert scheduler_cls_of(llava_path) is None


def test_each_feature_gets_the_collecting_scheduler(qwen3_path, llava_path):
    expected = "vllm_omni.v1.core.sched.output_collectors.OmniScheduler"  # CPU: no async scheduling
    assert scheduler_cls_of(qwen3_path, **PHS) == expected
    assert scheduler_cls_of(llava_path, enable_return_mm_embedding=True) == expected


def test_a_users_scheduler_cls_is_mapped_kept_or_refused(qwen3_path):
    async_name = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
    assert scheduler_cls_of(qwen3_path, scheduler_cls=async_name, **PHS).endswith(".OmniAsyncScheduler")
    assert scheduler_cls_of(qwen3_path, scheduler_cls=MyScheduler, **PHS) is MyScheduler
    message = (
        "return_prompt_hidden_states: scheduler_cls='vllm.v1.core.sched.diffusion_scheduler."
        "DiffusionScheduler' does not collect the per-request data the workers send; put "
        "vllm_omni.v1.core.sched.output_collectors.OutputCollectingScheduler first in its bases"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        scheduler_cls_of(
            qwen3_path, scheduler_cls="vllm.v1.core.sched.diffusion_scheduler.DiffusionScheduler", **PHS
        )


def test_model_runner_v2_is_refused():
    check_model_runner(SimpleNamespace(use_v2_model_runner=False), ["return_prompt_hidden_states"])
    with pytest.raises(ValueError, match="not supported with vLLM's Model Runner V2.*VLLM_USE_V2_MODEL"):
        check_model_runner(SimpleNamespace(use_v2_model_runner=True), ["return_prompt_hidden_states"])


def build_scheduler(qwen3_path, async_scheduling: bool) -> Scheduler:
    """The scheduler an EngineCore would build for a prompt hidden-state engine (async forced on)."""
    vllm_config = EngineArgs(model=qwen3_path, dtype="float32", **PHS).create_engine_config()
    if async_scheduling:
        vllm_config.scheduler_config.async_scheduling, vllm_config.scheduler_config.scheduler_cls = True, None
        use_collecting_scheduler(vllm_config, ["return_prompt_hidden_states"])
    block_size = vllm_config.cache_config.block_size
    vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=32, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]
    )
    return vllm_config.scheduler_config.get_scheduler_cls()(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
    )


def add(scheduler: Scheduler, req_id: str, max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, extra_args={"prompt_hidden_states": True})
    scheduler.add_request(Request(req_id, list(range(1, 9)), params, None))


def step(scheduler: Scheduler, sent: dict[str, torch.Tensor]) -> dict:
    """One schedule/update cycle; the workers sample token 5 and send ``sent``."""
    scheduler_output = scheduler.schedule()
    req_ids = list(scheduler_output.num_scheduled_tokens)
    runner_output = ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[5]] * len(req_ids),
    )
    runner_output.prompt_hidden_states = sent
    outputs = scheduler.update_from_output(scheduler_output, runner_output)
    return {o.request_id: o for client in outputs.values() for o in client.outputs}


@pytest.mark.parametrize(
    ("async_scheduling", "expected"), [(False, OmniScheduler), (True, OmniAsyncScheduler)]
)
def test_collecting_scheduler_attaches_once_and_forgets(qwen3_path, async_scheduling, expected):
    scheduler = build_scheduler(qwen3_path, async_scheduling)
    assert type(scheduler) is expected
    collector = next(c for c in scheduler.omni_collectors if isinstance(c, PromptHiddenStatesCollector))
    add(scheduler, "long", max_tokens=3)
    add(scheduler, "short", max_tokens=1)  # finishes (and is freed) within its first update
    rows = {"long": torch.randn(8, 64), "short": torch.randn(8, 64)}
    outputs = step(scheduler, rows)
    assert outputs["short"].finished and outputs["short"].prompt_hidden_states is rows["short"]
    assert outputs["long"].prompt_hidden_states is rows["long"]
    assert step(scheduler, {})["long"].prompt_hidden_states is None  # once
    add(scheduler, "aborted", max_tokens=3)
    collector.add(scheduler.requests["aborted"], torch.randn(8, 64))  # arrived, not yet attached
    scheduler.finish_requests(["long", "aborted"], RequestStatus.FINISHED_ABORTED)
    assert collector.requests == {}
