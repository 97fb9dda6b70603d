"""Per-completion tensors in ``/v1/chat/completions`` and ``/v1/completions`` responses, one path for
every ``TensorField`` (``FIELDS``: mm_embedding, prompt hidden states).

- Request models: vLLM's ``ChatCompletionRequest`` / ``CompletionRequest`` become subclasses with every
  field's request fields (validated: a bad value is a 400 naming the field).
- Serving classes: a request that asks for a field the server's engine does not return gets a 400; the
  engine's outputs are recorded as they pass to vLLM's response builders, and each asked field is set on
  every choice (``null`` when that completion has none). Streaming responses send one extra chunk per
  request right before ``data: [DONE]``, whose choices carry only ``index`` and the fields.

Choices are numbered as vLLM numbers them: prompt index * n + completion index.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from vllm_omni.entrypoints.openai.mm_embedding import MM_EMBEDDING
from vllm_omni.entrypoints.openai.prompt_hidden_states import PROMPT_HIDDEN_STATES
from vllm_omni.entrypoints.openai.tensors import TensorField

FIELDS: tuple[TensorField, ...] = (MM_EMBEDDING, PROMPT_HIDDEN_STATES)


def asked_fields(request: Any) -> tuple[TensorField, ...]:
    """The fields ``request`` asks for."""
    return tuple(field for field in FIELDS if field.asked(request))


class ChoiceTensors:
    """Passes a result stream through, keeping each choice's encoded tensors (the fields asked for)."""

    def __init__(self, request: Any, fields: tuple[TensorField, ...], num_choices: int = 1):
        self.request = request
        self.fields = fields
        self.num_choices = num_choices
        self.by_choice: dict[int, dict[str, Any]] = {}

    def add(self, prompt_index: int, output: Any) -> None:
        """Keep the tensors of one ``RequestOutput``."""
        for completion in output.outputs:
            for field in self.fields:
                encoded = field.encode(completion, self.request)
                if encoded is not None:
                    choice = prompt_index * self.num_choices + completion.index
                    self.by_choice.setdefault(choice, {})[field.name] = encoded

    async def record(self, results: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Pass ``results`` (``RequestOutput`` or ``(prompt index, RequestOutput)``) through."""
        async for item in results:
            self.add(*(item if isinstance(item, tuple) else (0, item)))
            yield item

    def attach(self, response: Any) -> None:
        """Set every asked field on every choice of a non-streaming response."""
        for position, choice in enumerate(response.choices):
            encoded = self.by_choice.get(choice.index if choice.index is not None else position, {})
            for field in self.fields:
                setattr(choice, field.name, encoded.get(field.name))

    async def append_chunk(self, sse_stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """Re-yield an SSE stream, adding one chunk with the tensors before ``data: [DONE]``."""
        last_chunk = None
        async for event in sse_stream:
            if event.startswith("data: [DONE]") and self.by_choice and last_chunk is not None:
                yield self._tensor_chunk(last_chunk)
            elif event.startswith("data: {"):
                last_chunk = event
            yield event

    def _tensor_chunk(self, template_event: str) -> str:
        template = json.loads(template_event[len("data: ") :])
        empty = {"delta": {}} if template.get("object") == "chat.completion.chunk" else {"text": ""}
        choices = [
            {"index": index, "finish_reason": None, **empty, **encoded}
            for index, encoded in sorted(self.by_choice.items())
        ]
        keys = ("id", "object", "created", "model")
        chunk = {**{k: template[k] for k in keys if k in template}, "choices": choices}
        return f"data: {json.dumps(chunk)}\n\n"


def swap_request(module: Any, class_name: str) -> None:
    """Replace ``module.<class_name>`` with a subclass that has every field's request fields."""
    request_cls = getattr(module, class_name)
    bases = (*(field.request_fields for field in FIELDS), request_cls)
    namespace = {"__module__": __name__, "__doc__": request_cls.__doc__}
    setattr(module, class_name, type(f"Omni{request_cls.__name__}", bases, namespace))


def swap_chat_request(module: Any) -> None:
    """``ChatCompletionRequest`` with the tensor fields."""
    swap_request(module, "ChatCompletionRequest")


def swap_completion_request(module: Any) -> None:
    """``CompletionRequest`` with the tensor fields."""
    swap_request(module, "CompletionRequest")


def _reject_when_off(stock_create):
    async def create(self, request, raw_request=None):
        for field in asked_fields(request):
            if not field.enabled(self):
                return self.create_error_response(field.not_enabled, param=field.request_flag)
        return await stock_create(self, request, raw_request)

    return create


def _stream_with_tensors(request: Any, results: AsyncIterator[Any], stream_of) -> AsyncIterator[str]:
    """``stream_of(results)`` (vLLM's SSE generator), with the asked tensors recorded from the results
    and sent in a last chunk."""
    fields = asked_fields(request)
    if not fields:
        return stream_of(results)
    recorder = ChoiceTensors(request, fields, num_choices=request.n or 1)
    return recorder.append_chunk(stream_of(recorder.record(results)))


def patch_chat_serving(module: Any) -> None:
    """Chat: reject when off; record the tensors from the results; put them in choices / a last chunk."""
    serving_cls = module.OpenAIServingChat
    stock_stream = serving_cls.chat_completion_stream_generator
    stock_full = serving_cls.chat_completion_full_generator

    def chat_completion_stream_generator(self, request, result_generator, *args, **kwargs):
        def stream_of(results):
            return stock_stream(self, request, results, *args, **kwargs)

        return _stream_with_tensors(request, result_generator, stream_of)

    async def chat_completion_full_generator(self, request, result_generator, *args, **kwargs):
        fields = asked_fields(request)
        if not fields:
            return await stock_full(self, request, result_generator, *args, **kwargs)
        recorder = ChoiceTensors(request, fields)
        response = await stock_full(self, request, recorder.record(result_generator), *args, **kwargs)
        if hasattr(response, "choices"):  # not an ErrorResponse
            recorder.attach(response)
        return response

    serving_cls.create_chat_completion = _reject_when_off(serving_cls.create_chat_completion)
    serving_cls.chat_completion_stream_generator = chat_completion_stream_generator
    serving_cls.chat_completion_full_generator = chat_completion_full_generator


def patch_completion_serving(module: Any) -> None:
    """Completions: the same, with choice index = prompt index * n + completion index."""
    serving_cls = module.OpenAIServingCompletion
    stock_stream = serving_cls.completion_stream_generator
    stock_response = serving_cls.request_output_to_completion_response

    def completion_stream_generator(self, request, engine_inputs, result_generator, *args, **kwargs):
        def stream_of(results):
            return stock_stream(self, request, engine_inputs, results, *args, **kwargs)

        return _stream_with_tensors(request, result_generator, stream_of)

    def request_output_to_completion_response(self, final_res_batch, request, *args, **kwargs):
        response = stock_response(self, final_res_batch, request, *args, **kwargs)
        fields = asked_fields(request)
        if fields:
            recorder = ChoiceTensors(request, fields, num_choices=request.n or 1)
            for prompt_index, output in enumerate(final_res_batch):
                recorder.add(prompt_index, output)
            recorder.attach(response)
        return response

    serving_cls.create_completion = _reject_when_off(serving_cls.create_completion)
    serving_cls.completion_stream_generator = completion_stream_generator
    serving_cls.request_output_to_completion_response = request_output_to_completion_response
