"""mm_embedding over the OpenAI-compatible server (``/v1/chat/completions``, ``/v1/completions``).

Request fields (all optional; the server must run with ``--enable-return-mm-embedding``)::

    "return_mm_embedding": true,              # ask for it (default false)
    "mm_embedding_modalities": ["image"],     # keep only these modalities
    "mm_embedding_dtype": "float16",          # auto | float16 | bfloat16 | float32
    "mm_embedding_pooling": "mean"            # none | mean (one row per item)

Each choice then carries ``"mm_embedding": {"data": <base64 of .npy bytes>, "shape": [n, hidden],
"dtype": "float32", "items": [{"modality", "index", "offset", "length"}, ...]}``. For ``bfloat16``,
which ``.npy`` cannot hold, the array holds the raw 16-bit patterns as ``uint16``. Streaming responses
send it in one extra chunk per request, right before ``data: [DONE]``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

from vllm_omni.entrypoints.openai.tensors import encode_tensor
from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams

NOT_ENABLED = "return_mm_embedding needs a multimodal model served with --enable-return-mm-embedding"


class MMEmbeddingRequestFields(BaseModel):
    """Fields added to ``ChatCompletionRequest`` and ``CompletionRequest``."""

    return_mm_embedding: bool = Field(
        default=False, description="Return the prompt's multimodal encoder embeddings in each choice."
    )
    mm_embedding_modalities: list[str] | None = Field(
        default=None, description="Keep only these modalities (default: all)."
    )
    mm_embedding_dtype: str = Field(
        default="auto", description="auto (as computed), float16, bfloat16 or float32."
    )
    mm_embedding_pooling: str = Field(default="none", description="none or mean (one row per item).")

    @model_validator(mode="after")
    def _check_mm_embedding_options(self):
        self.mm_embedding_params()
        return self

    def mm_embedding_params(self) -> MMEmbeddingParams:
        """The per-request options; a bad value raises ``ValueError`` naming the request field."""
        try:
            return MMEmbeddingParams(
                enabled=self.return_mm_embedding,
                modalities=self.mm_embedding_modalities,
                dtype=self.mm_embedding_dtype,
                pooling=self.mm_embedding_pooling,
            )
        except ValueError as e:  # name the request field, not the SamplingParams option
            raise ValueError(str(e).replace("mm_embedding.", "mm_embedding_")) from None

    def to_sampling_params(self, *args, **kwargs):
        params = super().to_sampling_params(*args, **kwargs)
        params.extra_args = {**(params.extra_args or {}), **self.mm_embedding_params().to_extra_args()}
        return params


def encode_mm_embedding(completion) -> dict[str, Any] | None:
    """The JSON form of one completion's embedding (``None`` when it has none)."""
    tensor: torch.Tensor | None = getattr(completion, "mm_embedding", None)
    if tensor is None:
        return None
    return {**encode_tensor(tensor), "items": [asdict(item) for item in completion.mm_embedding_items or []]}


class EmbeddingRecorder:
    """Passes a result stream through, keeping each choice's encoded embedding."""

    def __init__(self, num_choices: int = 1):
        self.num_choices = num_choices
        self.by_choice: dict[int, dict[str, Any]] = {}

    def add(self, prompt_index: int, output) -> None:
        """Keep the embeddings of one ``RequestOutput`` (choice = prompt index * n + completion)."""
        for completion in output.outputs:
            encoded = encode_mm_embedding(completion)
            if encoded is not None:
                self.by_choice[prompt_index * self.num_choices + completion.index] = encoded

    async def record(self, results):
        """Pass ``results`` (``RequestOutput`` or ``(prompt index, RequestOutput)``) through."""
        async for item in results:
            self.add(*(item if isinstance(item, tuple) else (0, item)))
            yield item

    def attach(self, response) -> None:
        """Set ``mm_embedding`` on every choice of a non-streaming response (``None`` if it has none)."""
        for position, choice in enumerate(response.choices):
            index = choice.index if choice.index is not None else position
            choice.mm_embedding = self.by_choice.get(index)

    async def append_chunk(self, sse_stream):
        """Re-yield an SSE stream, adding one chunk with the embeddings before ``data: [DONE]``."""
        last_chunk = None
        async for event in sse_stream:
            if event.startswith("data: [DONE]") and self.by_choice and last_chunk is not None:
                yield self._embedding_chunk(last_chunk)
            elif event.startswith("data: {"):
                last_chunk = event
            yield event

    def _embedding_chunk(self, template_event: str) -> str:
        template = json.loads(template_event[len("data: ") :])
        is_chat = template.get("object") == "chat.completion.chunk"
        choices = []
        for index, encoded in sorted(self.by_choice.items()):
            choice = {"index": index, "finish_reason": None, "mm_embedding": encoded}
            choice.update({"delta": {}} if is_chat else {"text": ""})
            choices.append(choice)
        keys = ("id", "object", "created", "model")
        chunk = {**{k: template[k] for k in keys if k in template}, "choices": choices}
        return f"data: {json.dumps(chunk)}\n\n"


def serving_enabled(serving) -> bool:
    mm_config = serving.model_config.multimodal_config
    return bool(getattr(mm_config, "enable_return_mm_embedding", False))


def _request_fields_subclass(request_cls):
    name = f"Omni{request_cls.__name__}"
    return type(name, (MMEmbeddingRequestFields, request_cls), {"__module__": __name__,
                                                               "__doc__": request_cls.__doc__})  # fmt: skip


def swap_request(module, class_name: str) -> None:
    """Replace ``module.<class_name>`` with a subclass that has the mm_embedding request fields."""
    setattr(module, class_name, _request_fields_subclass(getattr(module, class_name)))


def swap_chat_request(module) -> None:
    swap_request(module, "ChatCompletionRequest")


def swap_completion_request(module) -> None:
    swap_request(module, "CompletionRequest")


def _reject_when_off(stock_create):
    async def create(self, request, raw_request=None):
        if getattr(request, "return_mm_embedding", False) and not serving_enabled(self):
            return self.create_error_response(NOT_ENABLED)
        return await stock_create(self, request, raw_request)

    return create


def patch_chat_serving(module) -> None:
    """Chat: reject when off; record embeddings from the results; put them in choices / last chunk."""
    serving_cls = module.OpenAIServingChat
    stock_stream = serving_cls.chat_completion_stream_generator
    stock_full = serving_cls.chat_completion_full_generator

    def chat_completion_stream_generator(self, request, result_generator, *args, **kwargs):
        if not getattr(request, "return_mm_embedding", False):
            return stock_stream(self, request, result_generator, *args, **kwargs)
        recorder = EmbeddingRecorder()
        stream = stock_stream(self, request, recorder.record(result_generator), *args, **kwargs)
        return recorder.append_chunk(stream)

    async def chat_completion_full_generator(self, request, result_generator, *args, **kwargs):
        if not getattr(request, "return_mm_embedding", False):
            return await stock_full(self, request, result_generator, *args, **kwargs)
        recorder = EmbeddingRecorder()
        response = await stock_full(self, request, recorder.record(result_generator), *args, **kwargs)
        if hasattr(response, "choices"):
            recorder.attach(response)
        return response

    serving_cls.create_chat_completion = _reject_when_off(serving_cls.create_chat_completion)
    serving_cls.chat_completion_stream_generator = chat_completion_stream_generator
    serving_cls.chat_completion_full_generator = chat_completion_full_generator


def patch_completion_serving(module) -> None:
    """Completions: the same, with choice index = prompt index * n + completion index."""
    serving_cls = module.OpenAIServingCompletion
    stock_stream = serving_cls.completion_stream_generator
    stock_response = serving_cls.request_output_to_completion_response

    def completion_stream_generator(self, request, engine_inputs, result_generator, *args, **kwargs):
        if not getattr(request, "return_mm_embedding", False):
            return stock_stream(self, request, engine_inputs, result_generator, *args, **kwargs)
        recorder = EmbeddingRecorder(num_choices=request.n or 1)
        stream = stock_stream(self, request, engine_inputs, recorder.record(result_generator), *args,
                              **kwargs)  # fmt: skip
        return recorder.append_chunk(stream)

    def request_output_to_completion_response(self, final_res_batch, request, *args, **kwargs):
        response = stock_response(self, final_res_batch, request, *args, **kwargs)
        if getattr(request, "return_mm_embedding", False):
            recorder = EmbeddingRecorder(num_choices=request.n or 1)
            for prompt_index, output in enumerate(final_res_batch):
                recorder.add(prompt_index, output)
            recorder.attach(response)
        return response

    serving_cls.create_completion = _reject_when_off(serving_cls.create_completion)
    serving_cls.completion_stream_generator = completion_stream_generator
    serving_cls.request_output_to_completion_response = request_output_to_completion_response
