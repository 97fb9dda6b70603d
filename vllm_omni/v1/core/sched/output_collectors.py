"""EngineCore side of per-request worker data: collect from ``ModelRunnerOutput``, attach to outputs.

Each feature that sends per-request data from the workers (an attribute of ``ModelRunnerOutput``, see
``vllm_omni.v1.worker.runner_output``) has a collector class here, installed by its patch. One wrap of
``Scheduler.update_from_output`` hands each collector what arrived for the requests it still knows,
lets stock vLLM build the step's ``EngineCoreOutput``s, then sets each output's field to whatever the
collector has ready for that request. One wrap of ``Scheduler._free_request`` makes every collector
forget finished and aborted requests (after their last output is built).

A collector class has ``runner_attr`` (the ``ModelRunnerOutput`` attribute it reads), ``output_attr``
(the ``OmniEngineCoreOutput`` field it fills), a ``requests`` dict keyed by request id, and the methods
``add(request, received)``, ``pop_ready(req_id, finished)`` and ``discard(req_id)``.
"""

from typing import Any

_COLLECTOR_TYPES: list[type] = []
_ATTR = "_omni_collectors"  # on the Scheduler instance: {collector class: collector}


def collector(scheduler, collector_cls: type):
    """The scheduler's collector of ``collector_cls`` (``None`` until something arrived for it)."""
    return scheduler.__dict__.get(_ATTR, {}).get(collector_cls)


def install(module, collector_cls: type) -> None:
    """Register ``collector_cls`` and wrap ``module.Scheduler`` (once for all collectors)."""
    if collector_cls not in _COLLECTOR_TYPES:
        _COLLECTOR_TYPES.append(collector_cls)
    scheduler_cls = module.Scheduler
    if scheduler_cls.__dict__.get("_omni_collecting"):
        return
    stock_update = scheduler_cls.update_from_output
    stock_free = scheduler_cls._free_request

    def update_from_output(self, scheduler_output, model_runner_output):
        collectors = _receive(self, model_runner_output)
        self._omni_updating = True
        try:
            engine_core_outputs = stock_update(self, scheduler_output, model_runner_output)
        finally:
            self._omni_updating = False
        for active in collectors.values():
            if active.requests:
                _attach_ready(self, active, engine_core_outputs)
        return engine_core_outputs

    def _free_request(self, request, *args, **kwargs):
        # Inside update_from_output the request's final output is not built yet: forget it after.
        if not self.__dict__.get("_omni_updating"):
            for active in self.__dict__.get(_ATTR, {}).values():
                active.discard(request.request_id)
        return stock_free(self, request, *args, **kwargs)

    scheduler_cls.update_from_output = update_from_output
    scheduler_cls._free_request = _free_request
    scheduler_cls._omni_collecting = True


def _receive(scheduler, model_runner_output) -> dict[type, Any]:
    """Hand what the workers sent to the collectors, creating them on first arrival."""
    collectors = scheduler.__dict__.setdefault(_ATTR, {})
    for collector_cls in _COLLECTOR_TYPES:
        received = getattr(model_runner_output, collector_cls.runner_attr, None)
        if not received:
            continue
        active = collectors.get(collector_cls) or collectors.setdefault(collector_cls, collector_cls())
        for req_id, value in received.items():
            request = scheduler.requests.get(req_id)
            if request is not None:
                active.add(request, value)
    return collectors


def _attach_ready(scheduler, active, engine_core_outputs) -> None:
    for outputs in engine_core_outputs.values():
        for output in outputs.outputs:
            ready = active.pop_ready(output.request_id, output.finished)
            if ready is not None:
                setattr(output, active.output_attr, ready)
    # Requests freed during this update were kept until their last output was built.
    for req_id in [r for r in active.requests if r not in scheduler.requests]:
        active.discard(req_id)
