"""One stage of an omni pipeline: which engine runs it, on which model, with which modalities."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_omni.config.dit import DiTConfig
from vllm_omni.config.utils import from_known_keys

MODALITIES = ("text", "image", "latent", "hidden_states", "audio_codes", "audio")


@dataclass
class OmniStageConfig:
    """A pipeline stage: an autoregressive vLLM engine (``ar``), a diffusion engine (``dit``), or another
    registered stage kind (``vllm_omni.pipeline.kinds``)."""

    stage_id: int
    """Position of the stage in the pipeline (0 = first)."""
    engine_type: str
    """The stage kind: ``ar`` (vLLM engine), ``dit`` (diffusion engine) or another registered kind."""
    model_path: str
    """Model folder (Hugging Face layout for ``ar``; diffusers layout, ``model_index.json``, for ``dit``)."""
    input_modalities: list[str] = field(default_factory=lambda: ["text"])
    """What the stage consumes: any of ``text``, ``image``, ``latent``, ``hidden_states``, ``audio_codes``
    (codec token ids) that its kind takes."""
    output_modalities: list[str] | None = None
    """What the stage produces: any of ``text``, ``image``, ``latent``, ``hidden_states``, ``audio_codes``,
    ``audio`` that its kind makes (``ar``: text, hidden_states, audio_codes; ``dit``: image, latent;
    ``code2wav``: audio); default: the kind's first (text, image, audio)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Engine arguments of an ``ar`` stage (any ``vllm.EngineArgs`` field) or of a ``code2wav`` stage
    (``Code2WavConfig`` fields)."""
    dit_config: DiTConfig | None = None
    """Configuration of a ``dit`` stage (defaults when ``None``)."""
    final_output: bool = True
    """Whether the stage's output is part of what the pipeline returns."""
    source_stage: int | None = None
    """The earlier stage whose outputs feed this one (default: the stage before; none for stage 0)."""
    stage_input: str | None = None
    """Name of the registered stage-input function that turns the source's output into this stage's prompt
    (``vllm_omni.pipeline.stage_input``); default chosen from the modalities (text, hidden_states, image)."""
    replicas: int = 1
    """Copies of the stage, each its own process and engine; the pipeline sends each request to the copy
    with the fewest requests in it. A copy that dies fails only its own requests."""
    devices: str | list[str] | None = None
    """Device placement: the accelerator ids the stage's process sees (``CUDA_VISIBLE_DEVICES``, e.g.
    ``"0"`` or ``"1,2"``); a list gives each replica its own (one entry per replica); ``None`` keeps the
    parent's. CPU stages ignore it."""
    cpus: str | list[str] | None = None
    """CPU placement: the cores the stage's processes run on, in vLLM's format (``"0-3"``, ``"4,6"``):
    their affinity, one OpenMP thread per core, vLLM's ``VLLM_CPU_OMP_THREADS_BIND``; a list gives each
    replica its own (one entry per replica); ``None``: all."""
    resources: dict[str, float] | None = None
    """With the Ray launcher, what each replica's actor asks of the cluster: ``num_cpus``, ``num_gpus``,
    ``memory`` (bytes) and custom resources (``ray start --resources``; Ray's ``node:<ip>`` pins a node).
    Defaults: a CPU per core of ``cpus`` (else 1), a GPU per id of ``devices`` (else 0; Ray picks which).
    Local processes ignore it."""
    default_params: dict[str, Any] | None = None
    """Fields of the stage's params object that every request starts from (e.g. a talker's sampling:
    ``{"top_k": 40, "stop_token_ids": [...]}``): a request's dict entry overrides them field by field, a
    params object replaces them."""

    def __post_init__(self) -> None:
        where = f"stage {self.stage_id}"
        if not isinstance(self.stage_id, int) or self.stage_id < 0:
            raise ValueError(f"{where}: stage_id must be an integer >= 0")
        # Kinds live in the pipeline package and are imported lazily by name, the way vLLM's config looks
        # models up in its ModelRegistry.
        from vllm_omni.pipeline.kinds import get_stage_kind

        try:
            kind = get_stage_kind(self.engine_type)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if not self.model_path:
            raise ValueError(f"{where}: model_path is required")
        if self.output_modalities is None:
            self.output_modalities = list(kind.output_modalities[:1])
        for key in ("input_modalities", "output_modalities"):
            bad = [m for m in getattr(self, key) if m not in MODALITIES]
            if bad or not getattr(self, key):
                raise ValueError(f"{where}: {key} must be a non-empty list of {list(MODALITIES)}, got {bad}")
        if self.source_stage is None and self.stage_id > 0:
            self.source_stage = self.stage_id - 1
        if self.source_stage is not None and not 0 <= self.source_stage < self.stage_id:
            raise ValueError(f"{where}: source_stage must be an earlier stage, got {self.source_stage}")
        self._check_replicas(where)
        self._check_resources(where)
        if self.default_params is not None and not isinstance(self.default_params, dict):
            raise ValueError(f"{where}: default_params must be a dict of the params' fields")
        kind.check_config(self)  # the kind's own fields

    def _check_replicas(self, where: str) -> None:
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 1:
            raise ValueError(f"{where}: replicas must be an integer >= 1, got {self.replicas!r}")
        for key in ("devices", "cpus"):
            value = getattr(self, key)
            if isinstance(value, list) and len(value) != self.replicas:
                raise ValueError(
                    f"{where}: {key} lists {len(value)} placements for {self.replicas} replica(s); give one "
                    "per replica, or one string for all"
                )
        for replica in range(self.replicas):
            cpus = _entry(self.cpus, replica)
            if cpus is not None:
                parse_cpu_list(cpus, f"{where}: cpus")

    def _check_resources(self, where: str) -> None:
        resources = self.resources or {}
        if not isinstance(resources, dict) or not all(
            isinstance(key, str) and isinstance(value, (int, float)) and value >= 0
            for key, value in resources.items()
        ):
            raise ValueError(f"{where}: resources must map resource names to numbers >= 0, got {resources!r}")

    def for_replica(self, replica: int) -> OmniStageConfig:
        """The config one replica's process runs: ``devices`` and ``cpus`` its own entries."""
        if not isinstance(self.devices, list) and not isinstance(self.cpus, list):
            return self
        devices, cpus = _entry(self.devices, replica), _entry(self.cpus, replica)
        return dataclasses.replace(self, devices=devices, cpus=cpus, replicas=1)

    def replica_label(self, replica: int) -> str:
        """How errors name a replica: the stage's label, with ``replica 1`` when it has several."""
        return self.label if self.replicas == 1 else f"{self.label} replica {replica}"

    @property
    def label(self) -> str:
        """How errors name the stage: ``stage 1 (dit)``."""
        return f"stage {self.stage_id} ({self.engine_type})"


def _entry(value: str | list[str] | None, replica: int) -> str | None:
    return value[replica] if isinstance(value, list) else value


def parse_cpu_list(text: str, where: str = "cpus") -> list[int]:
    """CPU ids of a list like ``"0-3,6"`` (ValueError naming ``where`` otherwise)."""
    ids: list[int] = []
    try:
        for item in str(text).split(","):
            first, _, last = item.strip().partition("-")
            ids += range(int(first), int(last or first) + 1)
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise ValueError(f"{where} must list CPU ids like '0-3' or '4,6', got {text!r}")
    return ids


def load_stage_configs(path: str | Path) -> list[OmniStageConfig]:
    """The stages of a YAML pipeline file (``load_pipeline_file``)."""
    return load_pipeline_file(path)[0]


PIPELINE_LAUNCHERS = ("local", "ray")
"""What a pipeline file's ``launcher`` may name (``vllm_omni.pipeline.launcher.make_launcher``)."""


def load_pipeline_file(path: str | Path) -> tuple[list[OmniStageConfig], str | None]:
    """The stages of a YAML pipeline file, a ``stages`` list of :class:`OmniStageConfig` fields, and its
    ``launcher`` (``local`` or ``ray``; None when it names none).

    ``$VAR`` / ``${VAR}`` in a ``model_path`` is replaced by the environment variable's value.
    """
    import yaml

    with open(path) as f:
        document = yaml.safe_load(f)
    if not isinstance(document, dict) or not isinstance(document.get("stages"), list):
        raise ValueError(f"{path}: a pipeline file holds a 'stages' list of stage configs")
    unknown = sorted(set(document) - {"stages", "launcher"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; allowed: ['launcher', 'stages']")
    launcher = document.get("launcher")
    if launcher is not None and launcher not in PIPELINE_LAUNCHERS:
        raise ValueError(f"{path}: launcher must be one of {list(PIPELINE_LAUNCHERS)}, got {launcher!r}")
    stages = []
    for position, entry in enumerate(document["stages"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: stages[{position}] must be a mapping of stage config keys")
        where = f"{path}: stage {entry.get('stage_id', position)}: unknown key(s)"
        if isinstance(entry.get("model_path"), str):
            entry["model_path"] = os.path.expandvars(entry["model_path"])
        stages.append(from_known_keys(OmniStageConfig, entry, where))
    return stages, launcher


def create_ar_stage_config(
    stage_id: int,
    model_path: str,
    input_modalities: list[str] | None = None,
    output_modalities: list[str] | None = None,
    final_output: bool = True,
    *,
    source_stage: int | None = None,
    stage_input: str | None = None,
    replicas: int = 1,
    devices: str | list[str] | None = None,
    cpus: str | list[str] | None = None,
    resources: dict[str, float] | None = None,
    **engine_args: Any,
) -> OmniStageConfig:
    """An ``ar`` stage; ``engine_args`` are ``vllm.EngineArgs`` fields (e.g. ``max_model_len=512``)."""
    return OmniStageConfig(
        stage_id, "ar", model_path, input_modalities or ["text"], output_modalities,
        engine_args=engine_args, final_output=final_output, source_stage=source_stage,
        stage_input=stage_input, replicas=replicas, devices=devices, cpus=cpus, resources=resources,
    )  # fmt: skip


def create_dit_stage_config(
    stage_id: int,
    model_path: str,
    input_modalities: list[str] | None = None,
    output_modalities: list[str] | None = None,
    final_output: bool = True,
    *,
    source_stage: int | None = None,
    stage_input: str | None = None,
    replicas: int = 1,
    devices: str | list[str] | None = None,
    cpus: str | list[str] | None = None,
    resources: dict[str, float] | None = None,
    **dit_options: Any,
) -> OmniStageConfig:
    """A ``dit`` stage; ``dit_options`` are :class:`DiTConfig` fields (e.g. ``num_inference_steps=20``)."""
    return OmniStageConfig(
        stage_id, "dit", model_path, input_modalities or ["text"], output_modalities,
        dit_config=DiTConfig.from_dict(dit_options), final_output=final_output, source_stage=source_stage,
        stage_input=stage_input, replicas=replicas, devices=devices, cpus=cpus, resources=resources,
    )  # fmt: skip
