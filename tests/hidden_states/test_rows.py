"""Rows of several layers / every position on their own: what the worker sends each step, how the EngineCore
assembles them (chunks, preemption, growth, a gap) and when it lets them go.

The runner is ``FakeRunner`` of ``test_capture`` (the attributes the capturer reads); the auxiliary output
(layer 0 here) is twice the main one (layer -1), so a mixed-up layer shows.
"""

from types import SimpleNamespace

import numpy as np
import torch
from vllm import SamplingParams

from tests.hidden_states.test_capture import HIDDEN, FakeRunner
from vllm_omni.v1.core.sched.hidden_states import HiddenStatesCollector
from vllm_omni.v1.worker.prompt_hidden_states_capture import (
    ROWS_ATTR,
    HiddenStateRows,
    PromptHiddenStatesCapturer,
)

ALL = SamplingParams(max_tokens=8, extra_args={"prompt_hidden_states": "all"})
PROMPT = SamplingParams(extra_args={"prompt_hidden_states": True})


def step(runner: FakeRunner, capturer, schedule: dict[str, tuple[int, int]]) -> dict[str, HiddenStateRows]:
    """One forward pass computing positions ``first..first+n`` per request; the rows the step sends."""
    rows = [runner.truth[r][first : first + n] for r, (first, n) in schedule.items()]
    source = torch.cat([*rows, torch.zeros(3, HIDDEN)])
    runner.input_batch = SimpleNamespace(
        req_ids=list(schedule), num_computed_tokens_cpu=np.array([first for first, _ in schedule.values()])
    )
    runner.query_start_loc = SimpleNamespace(
        np=np.concatenate([[0], np.cumsum([n for _, n in schedule.values()])])
    )
    runner.execute_model_state = SimpleNamespace(
        hidden_states=source,
        aux_hidden_states=[2 * source],
        scheduler_output=SimpleNamespace(num_scheduled_tokens={r: n for r, (_, n) in schedule.items()}),
    )
    capturer.after_execute(runner)
    output = capturer.attach_pending(SimpleNamespace(req_ids=list(schedule), req_id_to_index={}))
    return getattr(output, ROWS_ATTR, None) or {}


def expected(runner: FakeRunner, req_id: str, num_rows: int) -> dict[int, torch.Tensor]:
    rows = runner.truth[req_id][:num_rows]
    return {0: 2 * rows, -1: rows}


def test_worker_sends_each_steps_rows_per_layer_and_keeps_nothing():
    runner = FakeRunner(a=(20, ALL), b=(6, PROMPT), c=(5, SamplingParams()))
    capturer = PromptHiddenStatesCapturer(layer=[0, -1], aux_index=(0, None))
    sent = step(runner, capturer, {"a": (0, 16), "b": (0, 6), "c": (0, 5)})
    assert sent.keys() == {"a", "b"} and capturer.num_tracked() == 0
    assert sent["a"].first == 0 and list(sent["a"].rows) == [0, -1]
    for layer, rows in expected(runner, "a", 16).items():
        torch.testing.assert_close(sent["a"].rows[layer], rows, atol=0, rtol=0)
    sent = step(runner, capturer, {"a": (16, 4), "b": (6, 1)})  # b decodes: a prompt request sends no more
    assert sent.keys() == {"a"} and sent["a"].first == 16
    sent = step(runner, capturer, {"a": (20, 1)})  # a decodes: its fed-back token's row
    torch.testing.assert_close(sent["a"].rows[-1], runner.truth["a"][20:21], atol=0, rtol=0)


def test_one_configured_layer_streams_all_requests_and_keeps_the_prompt_path():
    runner = FakeRunner(a=(10, ALL), b=(10, PROMPT))
    capturer = PromptHiddenStatesCapturer(layer=-1, aux_index=None)
    sent = step(runner, capturer, {"a": (0, 10), "b": (0, 10)})
    assert sent.keys() == {"a"} and list(sent["a"].rows) == [-1]
    assert capturer.pending == {}  # b's tensor was attached as prompt_hidden_states


def collector_for(
    runner: FakeRunner, req_id: str, max_tokens: int
) -> tuple[HiddenStatesCollector, SimpleNamespace]:
    params = runner.requests[req_id].sampling_params
    request = SimpleNamespace(
        request_id=req_id, num_prompt_tokens=runner.requests[req_id].num_prompt_tokens, max_tokens=max_tokens,
        sampling_params=params, num_tokens=0,
    )  # fmt: skip
    return HiddenStatesCollector(), request


def test_engine_core_assembles_chunks_and_a_recompute_and_delivers_all_rows_at_the_finish():
    runner = FakeRunner(a=(20, ALL))
    capturer = PromptHiddenStatesCapturer(layer=[0, -1], aux_index=(0, None))
    collector, request = collector_for(runner, "a", max_tokens=8)
    for schedule in (
        {"a": (0, 16)},
        {"a": (16, 4)},
        {"a": (20, 1)},
        {"a": (21, 1)},
        {"a": (0, 16)},
        {"a": (16, 7)},
    ):
        collector.add(request, step(runner, capturer, schedule)["a"])  # then preempted, recomputed from 0
        assert collector.pop_ready("a", finished=False) is None
    buffer = collector.requests["a"][1].buffers[-1]
    assert buffer.shape[0] == 20 + 8 - 1  # grew by doubling, capped at prompt + max_tokens - 1
    request.num_tokens = 20 + 4  # 4 generated: the last was never fed
    ready = collector.pop_ready("a", finished=True)
    assert collector.requests == {}
    for layer, rows in expected(runner, "a", 23).items():
        torch.testing.assert_close(ready[layer], rows, atol=0, rtol=0)


def test_a_prompt_request_gets_its_rows_once_and_a_gap_gets_nothing(caplog):
    runner = FakeRunner(a=(20, PROMPT), b=(20, ALL))
    capturer = PromptHiddenStatesCapturer(layer=[0, -1], aux_index=(0, None))
    collector, request = collector_for(runner, "a", max_tokens=8)
    collector.add(request, step(runner, capturer, {"a": (0, 16)})["a"])
    assert collector.pop_ready("a", finished=False) is None
    collector.add(request, step(runner, capturer, {"a": (16, 4)})["a"])
    ready = collector.pop_ready("a", finished=False)
    torch.testing.assert_close(ready[0], expected(runner, "a", 20)[0], atol=0, rtol=0)
    collector.add(request, step(runner, capturer, {"a": (0, 16)})["a"])  # a recompute after preemption
    assert collector.pop_ready("a", finished=True) is None  # once
    collector.discard("a")
    collector, request = collector_for(runner, "b", max_tokens=8)
    collector.add(request, step(runner, capturer, {"b": (16, 4)})["b"])  # as after a prefix-cache hit
    assert "has no rows 0..15: not returned" in caplog.text
    request.num_tokens = 21
    assert collector.pop_ready("b", finished=True) is None
    collector.discard("b")  # as the scheduler does when it frees the request
    assert collector.requests == {}
