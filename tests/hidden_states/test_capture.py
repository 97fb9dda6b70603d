"""``PromptHiddenStatesCapturer`` on its own: which rows it copies, when it sends, what it forgets.

The runner here is a plain namespace with the few attributes the capturer reads after vLLM's
``execute_model`` (the real model runner is exercised by the engine tests); it lets a test replay
schedules an engine produces only by chance, such as a preemption in the middle of a prefill.
"""

from types import SimpleNamespace

import numpy as np
import torch
from vllm import SamplingParams

from vllm_omni.v1.worker.prompt_hidden_states_capture import PromptHiddenStatesCapturer

HIDDEN = 8
ASKED = SamplingParams(extra_args={"prompt_hidden_states": True})


class FakeRunner:
    """Requests with known per-position hidden states; ``step`` lays out one forward pass's rows."""

    def __init__(self, **requests: tuple[int, SamplingParams]):
        self.truth = {r: torch.randn(p + 16, HIDDEN) for r, (p, _) in requests.items()}  # prompt + output
        self.requests = {
            r: SimpleNamespace(num_prompt_tokens=p, sampling_params=params)
            for r, (p, params) in requests.items()
        }

    def step(self, capturer, schedule: dict[str, tuple[int, int]], aux: bool = False):
        """Run ``capturer.after_execute`` for a batch computing positions ``first..first+n`` per request."""
        req_ids = list(schedule)
        rows = [self.truth[r][first : first + n] for r, (first, n) in schedule.items()]
        counts = [n for _, n in schedule.values()]
        source = torch.cat([*rows, torch.zeros(3, HIDDEN)])  # trailing padding rows, never read
        self.input_batch = SimpleNamespace(
            req_ids=req_ids, num_computed_tokens_cpu=np.array([first for first, _ in schedule.values()])
        )
        self.query_start_loc = SimpleNamespace(np=np.concatenate([[0], np.cumsum(counts)]))
        self.execute_model_state = SimpleNamespace(
            hidden_states=torch.full_like(source, float("nan")) if aux else source,
            aux_hidden_states=[source] if aux else None,
            scheduler_output=SimpleNamespace(num_scheduled_tokens=dict(zip(req_ids, counts, strict=True))),
        )
        capturer.after_execute(self)
        return capturer.take()

    def prompt(self, req_id: str) -> torch.Tensor:
        return self.truth[req_id][: self.requests[req_id].num_prompt_tokens]


def test_chunks_of_a_mixed_batch_are_assembled_and_sent_once():
    runner = FakeRunner(a=(40, ASKED), b=(10, SamplingParams()), c=(5, ASKED))
    capturer = PromptHiddenStatesCapturer(layer=-1, aux_index=None)
    assert runner.step(capturer, {"a": (0, 16), "b": (0, 10), "c": (0, 5)}).keys() == {"c"}
    assert runner.step(capturer, {"a": (16, 16), "b": (10, 1), "c": (5, 1)}) is None
    sent = runner.step(capturer, {"a": (32, 8), "b": (11, 1), "c": (6, 1)})
    assert sent.keys() == {"a"}
    torch.testing.assert_close(sent["a"], runner.prompt("a"), atol=0, rtol=0)
    assert runner.step(capturer, {"a": (40, 1), "c": (7, 1)}) is None  # decoding: nothing more


def test_preemption_mid_prefill_rewrites_rows_and_after_it_sends_nothing_again():
    runner = FakeRunner(a=(40, ASKED))
    capturer = PromptHiddenStatesCapturer(layer=-1, aux_index=None)
    runner.step(capturer, {"a": (0, 32)})
    runner.step(capturer, {"a": (0, 32)})  # preempted, recomputed from the start
    sent = runner.step(capturer, {"a": (32, 8)})
    torch.testing.assert_close(sent["a"], runner.prompt("a"), atol=0, rtol=0)
    assert runner.step(capturer, {"a": (0, 32)}) is None  # preempted after it was sent
    assert runner.step(capturer, {"a": (32, 10)}) is None


def test_aux_source_and_free():
    runner = FakeRunner(a=(12, ASKED), b=(50, ASKED))
    capturer = PromptHiddenStatesCapturer(layer=-2, aux_index=1)
    sent = runner.step(capturer, {"a": (0, 12), "b": (0, 20)}, aux=True)
    torch.testing.assert_close(sent["a"], runner.prompt("a"), atol=0, rtol=0)
    assert sent["a"].untyped_storage().nbytes() == sent["a"].nbytes  # its own memory, not the batch's
    assert capturer.num_tracked() == 2  # a: sent, b: being filled
    capturer.free(["a", "b"])
    assert capturer.num_tracked() == 0


def test_a_prompt_not_computed_from_its_start_is_not_returned(caplog):
    runner = FakeRunner(a=(40, ASKED))
    capturer = PromptHiddenStatesCapturer(layer=-1, aux_index=None)
    assert runner.step(capturer, {"a": (32, 8)}) is None  # as after a prefix-cache hit
    assert "starts at token 32" in caplog.text
