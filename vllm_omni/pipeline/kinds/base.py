"""What a stage kind is: its config checks, params, limits, engine and share of the request's result.

A :class:`StageKind` is used on both sides of a pipeline. In the manager's process it checks a stage
config, turns a user's per-request entry into the stage's params object, checks those params against the
limits the stage published when it became ready (before any stage computes) and merges the stage's output
into the request's :class:`~vllm_omni.pipeline.outputs.OmniRequestOutput`. In the stage's own process it
builds the :class:`StageEngine` the stage loop drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_omni.config.stage import MODALITIES, OmniStageConfig
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.pipeline.protocol import StageRequest
from vllm_omni.pipeline.stage_metrics import StageMetrics


@dataclass(frozen=True)
class StageRoute:
    """How one request's route uses a stage (``StageKind.prepare_params`` adjusts its params to it)."""

    streaming: bool
    """Snapshots are wanted while the request runs."""
    handed_on: bool = False
    """A later stage of the route reads this stage's output."""
    cut_short: bool = False
    """The route ends here although later stages exist: the request wants none of their outputs."""
    all_positions: bool = False
    """The stage reading this one's hidden states wants every position's, generated ones too."""
    streamed_on: bool = False
    """The stage reading this one's output takes it while it is made (``takes_input_while_made``): this
    stage reports every step, though not final."""


@dataclass(frozen=True)
class StageEvent:
    """An engine's news about one request, from one step."""

    request_id: str
    output: Any
    """The engine's output object (sent to the manager)."""
    finished: bool
    """Whether the request is done in this stage."""
    error: str | None = None
    """Why the request failed; None when it did not."""


class StageEngine:
    """A stage's engine as its stage process drives it: all-or-none adds, aborts, one step at a time."""

    def add(self, requests: list[StageRequest]) -> None:
        """Queue ``requests``; one that fails raises, and the others of the batch are aborted."""
        added = []
        try:
            for request in requests:
                self.add_one(request)
                added.append(request.request_id)
        except Exception:
            self.abort(added)
            raise

    def add_one(self, request: StageRequest) -> None:
        """Validate and queue one request (ValueError naming the field when it is refused)."""
        raise NotImplementedError

    def extend(self, request_id: str, prompt: Any, done: bool) -> None:
        """An open request's input so far (``StageRequest.open``; ValueError when it is refused)."""
        raise NotImplementedError(f"{type(self).__name__} takes no streamed input")

    def abort(self, request_ids: list[str]) -> None:
        """Drop these requests now, freeing what the engine holds for them."""
        raise NotImplementedError

    def step(self) -> list[StageEvent]:
        """One engine step; news of every request that progressed."""
        raise NotImplementedError

    def has_unfinished_requests(self) -> bool:
        """Whether ``step`` has work to do."""
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        """What the engine holds now (requests, bytes)."""
        raise NotImplementedError

    def limits(self) -> Any:
        """What the stage accepts: a picklable object for its kind's ``check_params``."""
        raise NotImplementedError

    def metrics(self) -> StageMetrics:
        """What only the engine knows of the stage's metrics (batch and queue, caches, vLLM's own); the
        stage loop adds step times and failures. Nothing by default."""
        return StageMetrics()

    def close(self) -> None:
        """Stop what the engine started (processes, threads)."""


class StageKind:
    """One kind of stage (``ar``, ``dit``, ...); instances are stateless and registered by name
    (``vllm_omni.pipeline.kinds.register_stage_kind``)."""

    name: str
    """The ``OmniStageConfig.engine_type`` of this kind."""
    output_modalities: tuple[str, ...]
    """What stages of this kind can produce; the first is a stage's default."""
    input_modalities: tuple[str, ...] = MODALITIES
    """What stages of this kind can consume (``OmniStageConfig.input_modalities`` must be among them)."""

    def check_config(self, config: OmniStageConfig) -> None:
        """Check and normalise the kind's own config fields (ValueError naming the field)."""
        for key, verb in (("input_modalities", "consumes"), ("output_modalities", "produces")):
            allowed = getattr(self, key)
            bad = [m for m in getattr(config, key) if m not in allowed]
            if bad:
                where = f"stage {config.stage_id}"
                raise ValueError(f"{where}: a {self.name!r} stage {verb} {list(allowed)}, not {bad} ({key})")

    def make_params(self, config: OmniStageConfig, entry: Any) -> Any:
        """The stage's params object for a user's ``entry``: ``None``, a dict of its fields, or the object."""
        raise NotImplementedError

    def prepare_params(self, config: OmniStageConfig, params: Any, route: StageRoute) -> Any:
        """Adjust ``params`` to how the request's route uses the stage."""
        return params

    def takes_input_while_made(self, params: Any) -> bool:
        """Whether a request with these (prepared) params takes its input while the stage before still
        makes it (an open request, ``StageEngine.extend``): then that stage reports every step and the
        manager hands each step's output on. Never, by default."""
        return False

    def check_params(self, limits: Any, params: Any) -> None:
        """Refuse (ValueError naming the field) params the stage with ``limits`` would refuse."""

    def queue_bound(self, limits: Any) -> int | None:
        """How many requests may be on their way to or in the stage at once; None: no bound."""
        return None

    def make_engine(self, config: OmniStageConfig) -> StageEngine:
        """The stage's engine, built in the stage's own process."""
        raise NotImplementedError

    def merge_output(self, result: OmniRequestOutput, output: Any) -> None:
        """Put what a final stage produced into the request's result."""

    def summarize(self, output: Any) -> dict[str, Any]:
        """A JSON-able summary of one of the stage's outputs (what a server reports per stage)."""
        return {}
