"""Worker side of per-position input extras (``vllm_omni.model_executor.models.input_extras``).

For a model that opts in, ``GPUModelRunner._preprocess`` (the base of the CPU runner's too) is wrapped:
after vLLM has built the step's inputs, the model's keyword arguments gain ``input_extras``, the row of
every scheduled token (the token at position ``p`` of its request reads row ``min(p, rows - 1)`` of the
request's tensor; padding and requests without extras: zeros). Each request's tensor is decoded from its
``SamplingParams.extra_args`` when first scheduled and kept on the runner's device; ``free_finished``
(from the ``_update_states`` wrap the request captures share) drops it when vLLM reports the request
finished or aborted (``finished_req_ids``). For any other model the wrap calls straight through.
"""

from __future__ import annotations

import torch

from vllm_omni.model_executor.models.input_extras import (
    INPUT_EXTRAS_KEY,
    read_input_extras,
    supports_input_extras,
)

_ATTR = "_omni_input_extras"  # on the runner instance: the InputExtrasStore, or False when not used


class InputExtrasStore:
    """The extras tensors of a runner's live requests, by request id."""

    def __init__(self, width: int, device: torch.device, dtype: torch.dtype) -> None:
        self.width, self.device, self.dtype = width, device, dtype
        self.tensors: dict[str, torch.Tensor | None] = {}

    def free(self, req_ids) -> None:
        """Forget finished or aborted requests."""
        for req_id in req_ids:
            self.tensors.pop(req_id, None)

    def tensor_of(self, req_id: str, sampling_params) -> torch.Tensor | None:
        """The request's extras (decoded and moved on first use; ``None`` when it has none)."""
        if req_id not in self.tensors:
            arg = (sampling_params.extra_args or {}).get(INPUT_EXTRAS_KEY) if sampling_params else None
            self.tensors[req_id] = None if arg is None else self._load(req_id, arg)
        return self.tensors[req_id]

    def _load(self, req_id: str, arg) -> torch.Tensor:
        extras = read_input_extras(arg)
        if extras.shape[1] != self.width:
            raise ValueError(
                f"request {req_id}: input_extras has {extras.shape[1]} columns, the model takes {self.width}"
            )
        return extras.to(device=self.device, dtype=self.dtype)

    def gather(self, runner, scheduler_output, num_input_tokens: int) -> torch.Tensor:
        """``(num_input_tokens, width)``: each scheduled token's row, in the batch's token order."""
        out = torch.zeros(num_input_tokens, self.width, device=self.device, dtype=self.dtype)
        batch = runner.input_batch
        offset = 0
        for index, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
            count = scheduler_output.num_scheduled_tokens[req_id]
            extras = self.tensor_of(req_id, runner.requests[req_id].sampling_params)
            if extras is not None:
                start = int(batch.num_computed_tokens_cpu[index])
                rows = torch.arange(start, start + count, device=self.device).clamp_(max=len(extras) - 1)
                out[offset : offset + count] = extras[rows]
            offset += count
        return out


def store_of(runner) -> InputExtrasStore | None:
    """The runner's store, created on first use (``None`` when its model takes no extras)."""
    store = runner.__dict__.get(_ATTR)
    if store is None:
        model = runner.get_model()
        store = False
        if supports_input_extras(model):
            store = InputExtrasStore(model.input_extras_width, runner.device, runner.model_config.dtype)
        runner.__dict__[_ATTR] = store
    return store or None


def num_input_extras(runner) -> int | None:
    """How many requests' extras the runner holds (``None`` when its model takes none)."""
    store = store_of(runner)
    return None if store is None else len(store.tensors)


def free_finished(runner, scheduler_output) -> None:
    """Drop the extras of the step's finished or aborted requests (called by the shared
    ``_update_states`` wrap of ``request_captures``; it runs before the model may be loaded)."""
    store = runner.__dict__.get(_ATTR)
    if store:
        store.free(scheduler_output.finished_req_ids)


def patch_model_runner(module) -> None:
    """Wrap ``GPUModelRunner._preprocess`` (gather) once."""
    runner_cls = module.GPUModelRunner
    stock_preprocess = runner_cls._preprocess

    def _preprocess(self, scheduler_output, num_input_tokens, intermediate_tensors=None):
        result = stock_preprocess(self, scheduler_output, num_input_tokens, intermediate_tensors)
        if (store := store_of(self)) is None:
            return result
        *inputs, model_kwargs, ec_connector_output = result
        extras = store.gather(self, scheduler_output, num_input_tokens)
        model_kwargs = {**model_kwargs, "input_extras": extras}
        return (*inputs, model_kwargs, ec_connector_output)

    runner_cls._preprocess = _preprocess
