"""Every message between the stage manager and a stage process (pickled by ``stage_io``).

Manager -> stage: :class:`AddRequests`, :class:`ExtendRequest`, :class:`AbortRequests`, :class:`GetStats`,
:class:`GetMetrics`, :class:`Shutdown`.
Stage -> manager: :class:`StageReady` or :class:`StageStartFailed` once, then :class:`StageOutputs` once per
engine step with news, :class:`StageReply` to each add, stats and metrics request, :class:`StageFailed`
before it exits on an engine failure. Each message names its kind with ``type``, the way vLLM's
``EngineCoreRequestType`` does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar


class StageMessageType(enum.Enum):
    """The kinds of message."""

    ADD = "add"
    EXTEND = "extend"
    ABORT = "abort"
    GET_STATS = "get_stats"
    GET_METRICS = "get_metrics"
    SHUTDOWN = "shutdown"
    READY = "ready"
    START_FAILED = "start_failed"
    OUTPUTS = "outputs"
    REPLY = "reply"
    FAILED = "failed"


@dataclass(frozen=True)
class StageRequest:
    """One request as a stage gets it."""

    request_id: str
    """The request's id in this stage (a fresh one per stage it enters)."""
    prompt: Any
    """The stage's input: what the stage-input function made of the request."""
    params: Any
    """The stage's params object (``SamplingParams``, ``DiffusionSamplingParams``, ...)."""
    open: bool = False
    """The prompt is the input so far: more comes in :class:`ExtendRequest` messages, while the stage before
    still makes it (a stage kind that ``takes_input_while_made``)."""


@dataclass(frozen=True)
class StageOutput:
    """A stage's news about one request."""

    request_id: str
    finished: bool
    """Whether the request is done in this stage."""
    error: str | None
    """Why the request failed in this stage; None when it did not."""
    payload: bytes
    """The engine's output object, pickled by itself (``stage_io.dumps``): the manager loads, forwards or
    drops each request's tensors on their own."""


@dataclass(frozen=True)
class AddRequests:
    """Queue requests in the stage, all or none; the stage answers with a :class:`StageReply`."""

    type: ClassVar[StageMessageType] = StageMessageType.ADD
    token: int
    requests: list[StageRequest]


@dataclass(frozen=True)
class ExtendRequest:
    """An open request's input so far (the whole of it, growing); ``done``: it is complete."""

    type: ClassVar[StageMessageType] = StageMessageType.EXTEND
    request_id: str
    prompt: Any
    done: bool


@dataclass(frozen=True)
class AbortRequests:
    """Drop these requests at once (ids the stage does not serve are ignored)."""

    type: ClassVar[StageMessageType] = StageMessageType.ABORT
    request_ids: list[str]


@dataclass(frozen=True)
class GetStats:
    """Ask what the stage's engine holds; answered by a :class:`StageReply` after the stage's next step."""

    type: ClassVar[StageMessageType] = StageMessageType.GET_STATS
    token: int


@dataclass(frozen=True)
class GetMetrics:
    """Ask for the stage's ``StageMetrics`` (``pipeline.stage_metrics``); answered like :class:`GetStats`."""

    type: ClassVar[StageMessageType] = StageMessageType.GET_METRICS
    token: int


@dataclass(frozen=True)
class Shutdown:
    """Stop serving and exit."""

    type: ClassVar[StageMessageType] = StageMessageType.SHUTDOWN


@dataclass(frozen=True)
class StageReady:
    """The engine is built; ``limits`` is what the stage accepts (its kind's limits object), checked by the
    manager before any stage computes."""

    type: ClassVar[StageMessageType] = StageMessageType.READY
    stage_id: int
    limits: Any


@dataclass(frozen=True)
class StageStartFailed:
    """The engine could not be built; ``error`` is the traceback."""

    type: ClassVar[StageMessageType] = StageMessageType.START_FAILED
    stage_id: int
    error: str


@dataclass(frozen=True)
class StageOutputs:
    """What one engine step produced."""

    type: ClassVar[StageMessageType] = StageMessageType.OUTPUTS
    stage_id: int
    outputs: list[StageOutput]


@dataclass(frozen=True)
class StageReply:
    """The answer to the message with ``token``: ``value``, or ``error`` as (exception type name, message)."""

    type: ClassVar[StageMessageType] = StageMessageType.REPLY
    stage_id: int
    token: int
    value: Any = None
    error: tuple[str, str] | None = None


@dataclass(frozen=True)
class StageFailed:
    """The engine failed while serving; the stage exits. ``error`` is the traceback."""

    type: ClassVar[StageMessageType] = StageMessageType.FAILED
    stage_id: int
    error: str
