"""Worker side of per-request outputs: one set of ``GPUModelRunner`` wraps shared by every capture.

Each feature that sends per-request data to the EngineCore defines a ``RequestCapture`` (see
``runner_output``) and is listed in ``CAPTURE_TYPES``. On first use a runner gets one capture per
feature its engine has on (none: every wrap calls straight through). The wraps, applied once to the
base class of vLLM's CUDA and CPU runners:

- ``_setup_eagle3_aux_hidden_state_outputs`` (at load, before compile): each capture's ``after_load``;
- ``_update_states``: every capture, and the input-extras store (``input_extras``), forgets the step's
  finished requests first;
- ``_gather_mm_embeddings``: each capture's ``after_gather``;
- ``execute_model``: each capture's ``after_execute``, then pending data onto the output (if any);
- ``sample_tokens``: pending data onto the step's ``ModelRunnerOutput``, one attribute per capture.

vLLM's ``worker_cls`` / ``worker_extension_cls`` do not reach the runner; docs/patch_layer.md says why.
"""

from __future__ import annotations

from vllm_omni.v1.worker import input_extras
from vllm_omni.v1.worker.mm_embedding_capture import MMEmbeddingCapturer
from vllm_omni.v1.worker.prompt_hidden_states_capture import PromptHiddenStatesCapturer
from vllm_omni.v1.worker.runner_output import RequestCapture

CAPTURE_TYPES: tuple[type[RequestCapture], ...] = (MMEmbeddingCapturer, PromptHiddenStatesCapturer)
_ATTR = "_omni_captures"  # on the runner instance: tuple of its active captures


def captures(runner) -> tuple[RequestCapture, ...]:
    """The runner's captures, created on first use: one per feature on in its engine."""
    active = runner.__dict__.get(_ATTR)
    if active is None:
        created = (capture_cls.from_runner(runner) for capture_cls in CAPTURE_TYPES)
        active = runner.__dict__[_ATTR] = tuple(c for c in created if c is not None)
    return active


def capture_of(runner, capture_cls: type[RequestCapture]) -> RequestCapture | None:
    """The runner's capture of ``capture_cls`` (``None`` while that feature is off)."""
    return next((c for c in captures(runner) if isinstance(c, capture_cls)), None)


def _attach_pending(runner, output):
    for capture in captures(runner):
        output = capture.attach_pending(output)
    return output


def patch_model_runner(module) -> None:
    """Wrap ``GPUModelRunner`` (the base of the CPU runner too) once for every capture."""
    runner_cls = module.GPUModelRunner
    stock_setup_aux = runner_cls._setup_eagle3_aux_hidden_state_outputs
    stock_update = runner_cls._update_states
    stock_gather = runner_cls._gather_mm_embeddings
    stock_execute = runner_cls.execute_model
    stock_sample = runner_cls.sample_tokens

    def _setup_eagle3_aux_hidden_state_outputs(self):
        stock_setup_aux(self)
        for capture in captures(self):
            capture.after_load(self)

    def _update_states(self, scheduler_output):
        for capture in captures(self):
            capture.free_finished(scheduler_output)
        input_extras.free_finished(self, scheduler_output)
        return stock_update(self, scheduler_output)

    def _gather_mm_embeddings(self, scheduler_output, shift_computed_tokens=0):
        result = stock_gather(self, scheduler_output, shift_computed_tokens)
        for capture in captures(self):
            capture.after_gather(self, scheduler_output, shift_computed_tokens)
        return result

    def execute_model(self, *args, **kwargs):
        output = stock_execute(self, *args, **kwargs)
        for capture in captures(self):
            capture.after_execute(self)
        return _attach_pending(self, output)

    def sample_tokens(self, *args, **kwargs):
        return _attach_pending(self, stock_sample(self, *args, **kwargs))

    for wrapper in (
        _setup_eagle3_aux_hidden_state_outputs,
        _update_states,
        _gather_mm_embeddings,
        execute_model,
        sample_tokens,
    ):
        setattr(runner_cls, wrapper.__name__, wrapper)
