"""Dividing one GPU between the ``ar`` and ``dit`` stages placed on it, before any stage starts.

A vLLM engine takes ``gpu_memory_utilization`` of its device (0.9 by default) and fills what its weights
leave with KV cache, so a DiT stage beside it would find no room. On every CUDA device that holds both
kinds, the plan reserves each DiT stage's need (weights, its running batch's working memory, its
conditioning cache: :func:`dit_need`) plus a margin, gives the ``ar`` stages what is left as their
``gpu_memory_utilization`` and bounds each DiT stage's running batch by its reservation
(``DiTConfig.memory_budget``), unless a stage sets its own value. When the reservations exceed the
device, the pipeline refuses to start and says who needs what. docs/features/omni_pipelines.md, "One GPU
for AR and DiT stages", writes the arithmetic down with an example. On CPU there is nothing to divide.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from vllm_omni.config.dit import DiTConfig
from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.diffusion.memory import GIB, DiTMemoryEstimate
from vllm_omni.logger import init_logger
from vllm_omni.transformers_utils.model_resolution import diffusers_folder

logger = init_logger(__name__)

MARGIN_BYTES = 2 * GIB
"""Kept free on a shared device: the DiT process's CUDA context and kernels (~0.5 GiB) and its caching
allocator's slack."""


@dataclass(frozen=True)
class DiTNeed:
    """What a DiT stage reserves on its device, and why."""

    label: str
    weight_bytes: int
    request_bytes: int
    """Working memory of one request at the stage's default size."""
    max_running: int
    """Requests the reservation holds at that size (``max_batch_size``, or what ``memory_budget`` holds)."""
    working_bytes: int
    """The running batch's reservation: ``memory_budget`` when set, else ``max_batch_size`` requests."""
    cache_bytes: int
    """The conditioning cache's budget (its tensors live on the device)."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.working_bytes + self.cache_bytes

    def describe(self) -> str:
        return (
            f"{self.label} {_gib(self.total_bytes)} (weights {_gib(self.weight_bytes)}, running batch "
            f"{_gib(self.working_bytes)} ({self.max_running} x {_gib(self.request_bytes)} at the default "
            f"size), conditioning cache {_gib(self.cache_bytes)})"
        )


def dit_need(label: str, estimate: DiTMemoryEstimate, config: DiTConfig) -> DiTNeed:
    """The reservation of a DiT stage run as ``config`` whose model ``estimate`` describes."""
    per_request = estimate.request_bytes()
    budget = config.memory_budget
    max_running = (
        config.max_batch_size if budget is None else min(config.max_batch_size, budget // per_request)
    )
    return DiTNeed(
        label=label,
        weight_bytes=estimate.weight_bytes,
        request_bytes=per_request,
        max_running=max_running,
        working_bytes=per_request * config.max_batch_size if budget is None else budget,
        cache_bytes=config.cache.conditioning_cache_bytes,
    )


@dataclass(frozen=True)
class DeviceSplit:
    """How one device is divided."""

    device: str
    total_bytes: int
    dit_needs: list[DiTNeed]
    margin_bytes: int
    ar_shares: dict[str, float]
    """Label -> ``gpu_memory_utilization`` of each ``ar`` stage on the device."""

    def describe(self) -> str:
        """The log line: the device, each stage's part, the margin."""
        parts = [f"{need.describe()} reserved" for need in self.dit_needs]
        parts += [
            f"{label} gpu_memory_utilization {share}" if share > 0 else f"{label} nothing left"
            for label, share in self.ar_shares.items()
        ]
        parts.append(f"margin {_gib(self.margin_bytes)}")
        return f"GPU {self.device} ({_gib(self.total_bytes)}): {'; '.join(parts)}"


def split_device(
    device: str,
    total_bytes: int,
    dit_needs: list[DiTNeed],
    ar_stages: dict[str, float | None],
    margin_bytes: int = MARGIN_BYTES,
) -> DeviceSplit:
    """Each ``ar`` stage's ``gpu_memory_utilization`` on a device of ``total_bytes`` that also holds the
    ``dit_needs``: its own when given (``ar_stages``: label -> the value set, or None), else an equal share of
    what the DiT stages, the margin and the given values leave, rounded down to 0.001. Raises ``ValueError``
    naming every stage's need and the device's size when they do not fit."""
    given = {label: value for label, value in ar_stages.items() if value is not None}
    unset = [label for label, value in ar_stages.items() if value is None]
    reserved = sum(need.total_bytes for need in dit_needs) + margin_bytes + sum(given.values()) * total_bytes
    share = math.floor((total_bytes - reserved) / max(len(unset), 1) / total_bytes * 1000) / 1000
    split = DeviceSplit(
        device, total_bytes, dit_needs, margin_bytes, {**given, **dict.fromkeys(unset, share)}
    )
    if reserved > total_bytes or (unset and share <= 0):
        raise ValueError(
            f"the stages do not fit on {split.describe()}: they need more than the device has. Lower the DiT "
            "stages' max_batch_size, memory_budget or default size, or an ar stage's gpu_memory_utilization, "
            "or place the stages on different devices"
        )
    return split


def plan_memory(
    stages: list[OmniStageConfig], device_bytes: Callable[[str], int] | None = None
) -> list[OmniStageConfig]:
    """``stages`` with every CUDA device that holds ``ar`` and ``dit`` stages divided between them: copies of
    the ``ar`` stages with ``gpu_memory_utilization`` set (a stage on several shared devices gets its smallest
    share) and of the ``dit`` stages with ``memory_budget`` set to their reservation, so that the running
    batch keeps within it whatever sizes the requests ask for; a value the stage sets is kept.
    ``device_bytes``: a device's total bytes by its ``CUDA_VISIBLE_DEVICES`` id (default: torch's, when CUDA
    is available; without CUDA nothing changes). Logs one line per shared device; ``ValueError`` when its
    stages do not fit."""
    if device_bytes is None:
        import torch

        if not torch.cuda.is_available():
            return stages
        device_bytes = device_total_bytes
    shares: dict[int, float] = {}
    budgets: dict[int, int] = {}
    for device, (dits, ars) in _shared_devices(stages).items():
        needs = [dit_need(s.label, _estimate(s), s.dit_config) for s in dits]
        given = {s.label: s.engine_args.get("gpu_memory_utilization") for s in ars}
        split = split_device(device, device_bytes(device), needs, given)
        logger.info("Shared %s", split.describe())
        budgets.update((stage.stage_id, need.working_bytes) for stage, need in zip(dits, needs, strict=True))
        for stage in ars:
            shares[stage.stage_id] = min(shares.get(stage.stage_id, 1.0), split.ar_shares[stage.label])
    return [_planned(stage, shares.get(stage.stage_id), budgets.get(stage.stage_id)) for stage in stages]


def device_total_bytes(device: str) -> int:
    """Total memory of CUDA device ``device`` (an id as ``CUDA_VISIBLE_DEVICES`` names it), through torch in
    this process: the device's properties, no context is created on it."""
    import torch

    visible = _parent_devices()
    if visible is not None and device not in visible:
        raise ValueError(
            f"cannot size GPU {device}: this process sees CUDA_VISIBLE_DEVICES={','.join(visible)}; make it "
            "visible here, or place the stages within it"
        )
    index = int(device) if visible is None else visible.index(device)
    return torch.cuda.get_device_properties(index).total_memory


def _shared_devices(
    stages: list[OmniStageConfig],
) -> dict[str, tuple[list[OmniStageConfig], list[OmniStageConfig]]]:
    """Device id -> (its GPU dit stages, its ar stages), for the devices holding both. A dit stage replica
    runs on the first device it sees; an ar stage replica on all it sees (tensor and pipeline parallel)."""
    groups: dict[str, tuple[list, list]] = {}
    for stage in stages:
        if stage.engine_type == "dit" and stage.dit_config.device != "cpu":
            for device in {_devices(stage, replica, 1)[0] for replica in range(stage.replicas)}:
                groups.setdefault(device, ([], []))[0].append(stage)
    for stage in stages:
        if stage.engine_type == "ar":
            args = stage.engine_args
            parallel = args.get("tensor_parallel_size", 1) * args.get("pipeline_parallel_size", 1)
            for device in {d for r in range(stage.replicas) for d in _devices(stage, r, parallel)}:
                if device in groups:
                    groups[device][1].append(stage)
    return {device: group for device, group in groups.items() if group[1]}


def _devices(stage: OmniStageConfig, replica: int, count: int) -> list[str]:
    """The device ids a stage replica's process sees (its ``devices``, else ours), the first ``count``."""
    devices = stage.for_replica(replica).devices
    visible = devices.split(",") if devices is not None else _parent_devices()
    return [d.strip() for d in visible][:count] if visible else [str(i) for i in range(count)]


def _parent_devices() -> list[str] | None:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [d.strip() for d in value.split(",") if d.strip()]


def _estimate(stage: OmniStageConfig) -> DiTMemoryEstimate:
    config = stage.dit_config
    return DiTMemoryEstimate.from_folder(diffusers_folder(stage.model_path, config.revision), config)


def _planned(stage: OmniStageConfig, share: float | None, budget: int | None) -> OmniStageConfig:
    """``stage`` with its planned ``gpu_memory_utilization`` or ``memory_budget``, unless it sets its own."""
    if share is not None and "gpu_memory_utilization" not in stage.engine_args:
        return dataclasses.replace(stage, engine_args={**stage.engine_args, "gpu_memory_utilization": share})
    if budget is not None and stage.dit_config.memory_budget is None:
        return dataclasses.replace(
            stage, dit_config=dataclasses.replace(stage.dit_config, memory_budget=budget)
        )
    return stage


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"
