"""``/v1/chat/completions`` request schema: messages may hold ``multimodal_embeddings`` content parts.

The part is parsed by ``vllm_omni.renderers.multimodal_embeddings``; this module only lets it through
request validation. ``messages`` is a union of OpenAI's message types and vLLM's
``CustomChatCompletionMessageParam``; a part type neither knows is stripped to ``{}`` or makes the OpenAI
user-message type win, which then fails lazily (HTTP 400 "validation errors for ValidatorIterator")
whenever the message holds no text part. So the custom message's ``content`` gains the part type and
``ChatCompletionRequest`` is rebuilt. Request models defined after this runs (in modules imported later)
pick the new annotation up when they are built.
"""

from types import ModuleType
from typing import Any, Literal

from typing_extensions import Required, TypedDict  # pydantic rejects typing.TypedDict before Python 3.12


class MultimodalEmbeddingsPartParam(TypedDict, total=False):
    """``{"type": "multimodal_embeddings", "multimodal_embeddings": {name: base64 | [base64, ...]}}``.

    The payload is typed loosely here on purpose: the renderer checks it and answers a 400 that names
    the field and what is allowed, instead of pydantic's errors for every member of the message union.
    """

    type: Required[Literal["multimodal_embeddings"]]
    multimodal_embeddings: Required[Any]


def accept_part_in_chat_request(module: ModuleType) -> None:
    """Let ``CustomChatCompletionMessageParam.content`` hold the part; rebuild ``ChatCompletionRequest``."""
    from vllm.renderers import chat_utils

    content = str | list[MultimodalEmbeddingsPartParam | chat_utils.ChatCompletionContentPartParam]
    chat_utils.CustomChatCompletionMessageParam.__annotations__["content"] = content
    module.ChatCompletionRequest.model_rebuild(force=True)
