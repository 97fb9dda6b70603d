"""EngineCore side of per-request worker data: a scheduler that collects it and attaches it to outputs.

Each feature that sends per-request data from the workers (an attribute of ``ModelRunnerOutput``, see
``vllm_omni.v1.worker.runner_output``) has a collector class, listed in ``COLLECTOR_TYPES``.
``OutputCollectingScheduler`` is a mixin for vLLM's ``Scheduler``: its ``update_from_output`` hands
each collector what arrived for the requests it still knows, lets vLLM build the step's
``EngineCoreOutput``s, then sets each output's field to whatever the collector has ready for that
request; its ``_free_request`` makes every collector forget finished and aborted requests (after their
last output is built).

vLLM builds it through ``SchedulerConfig.scheduler_cls``, which ``use_collecting_scheduler`` sets only
for engines with such a feature on (``OmniScheduler``, or ``OmniAsyncScheduler`` under async
scheduling): every other engine runs vLLM's own scheduler, unchanged.

A collector class has ``argument`` (the engine argument that turns it on), ``enabled(vllm_config)``,
``runner_attr`` (the ``ModelRunnerOutput`` attribute it reads), ``output_attr`` (the
``OmniEngineCoreOutput`` field it fills), a ``requests`` dict keyed by request id, and the methods
``add(request, received)``, ``pop_ready(req_id, finished)`` and ``discard(req_id)``.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_omni.v1.core.sched.hidden_states import HiddenStatesCollector
from vllm_omni.v1.core.sched.mm_embedding import MMEmbeddingCollector
from vllm_omni.v1.core.sched.prompt_hidden_states import PromptHiddenStatesCollector

COLLECTOR_TYPES: tuple[type, ...] = (MMEmbeddingCollector, PromptHiddenStatesCollector, HiddenStatesCollector)


class OutputCollectingScheduler:
    """Mixin that makes a vLLM ``Scheduler`` (sub)class collect per-request worker data.

    Put it first in the bases of your own scheduler to use that one with these features.
    """

    # Class defaults: a scheduler built without __init__ (as some of vLLM's unit tests do) collects nothing.
    omni_collectors: tuple = ()
    _omni_updating = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.omni_collectors = tuple(cls() for cls in COLLECTOR_TYPES if cls.enabled(self.vllm_config))

    def update_from_output(self, scheduler_output, model_runner_output):
        _receive(self, model_runner_output)
        self._omni_updating = True
        try:
            engine_core_outputs = super().update_from_output(scheduler_output, model_runner_output)
        finally:
            self._omni_updating = False
        for collector in self.omni_collectors:
            if collector.requests:
                _attach_ready(self, collector, engine_core_outputs)
        return engine_core_outputs

    def _free_request(self, request, *args, **kwargs):
        # Inside update_from_output the request's final output is not built yet: forget it after.
        if not self._omni_updating:
            for collector in self.omni_collectors:
                collector.discard(request.request_id)
        return super()._free_request(request, *args, **kwargs)


class OmniScheduler(OutputCollectingScheduler, Scheduler):
    """vLLM's ``Scheduler`` collecting per-request worker data."""


class OmniAsyncScheduler(OutputCollectingScheduler, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` collecting per-request worker data."""


_COLLECTING = {Scheduler: OmniScheduler, AsyncScheduler: OmniAsyncScheduler}


def collector(scheduler, collector_cls: type):
    """The scheduler's collector of ``collector_cls`` (``None`` when that feature is off)."""
    active = getattr(scheduler, "omni_collectors", ())  # vLLM's own scheduler has none
    return next((c for c in active if isinstance(c, collector_cls)), None)


def enabled_arguments(vllm_config) -> list[str]:
    """The engine arguments of the features on in ``vllm_config`` that send per-request data."""
    # dict.fromkeys: one feature (argument) may have several collectors.
    return list(dict.fromkeys(cls.argument for cls in COLLECTOR_TYPES if cls.enabled(vllm_config)))


def use_collecting_scheduler(vllm_config, arguments: list[str]) -> None:
    """Make the EngineCore build a collecting scheduler, for the engine ``arguments`` that need one.

    vLLM's ``Scheduler`` / ``AsyncScheduler`` (chosen by default or named in ``scheduler_cls``) become
    ``OmniScheduler`` / ``OmniAsyncScheduler``; a ``scheduler_cls`` that already collects is kept; any
    other is refused with ``ValueError``.
    """
    scheduler_config = vllm_config.scheduler_config
    chosen = scheduler_config.get_scheduler_cls()
    if issubclass(chosen, OutputCollectingScheduler):
        return
    collecting = _COLLECTING.get(chosen)
    if collecting is None:
        raise ValueError(
            f"{', '.join(arguments)}: scheduler_cls={scheduler_config.scheduler_cls!r} does not collect "
            "the per-request data the workers send; put "
            f"{__name__}.OutputCollectingScheduler first in its bases, or leave scheduler_cls unset"
        )
    scheduler_config.scheduler_cls = f"{collecting.__module__}.{collecting.__qualname__}"


def _receive(scheduler, model_runner_output) -> None:
    """Hand what the workers sent to the collectors."""
    for active in scheduler.omni_collectors:
        received = getattr(model_runner_output, active.runner_attr, None)
        for req_id, value in (received or {}).items():
            request = scheduler.requests.get(req_id)
            if request is not None:
                active.add(request, value)


def _attach_ready(scheduler, active, engine_core_outputs) -> None:
    for outputs in engine_core_outputs.values():
        for output in outputs.outputs:
            ready = active.pop_ready(output.request_id, output.finished)
            if ready is not None:
                setattr(output, active.output_attr, ready)
    # Requests freed during this update were kept until their last output was built.
    for req_id in [r for r in active.requests if r not in scheduler.requests]:
        active.discard(req_id)
