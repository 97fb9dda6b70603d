"""Configuration of a diffusion-transformer (DiT) stage: model, sampler defaults, batching and caches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_omni.config.utils import from_known_keys

DTYPES = ("float32", "bfloat16", "float16")
CACHE_POLICIES = ("fifo", "lru", "lfu")
STEP_CACHES = ("first_block",)
ATTENTION_BACKENDS = ("sdpa", "xformers")
DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("auto", "native", "diffusers")
COMPILE_MODES = ("auto", "on", "off")


@dataclass
class DiTCacheConfig:
    """Caches of a DiT stage.

    The conditioning cache keeps text-encoder outputs per (encoder, text) so a repeated prompt or negative
    prompt is not encoded again. The step cache reuses the transformer's residual between denoising steps
    when its first block's output barely changed (first-block cache); it trades exactness for speed and is
    off by default.
    """

    conditioning_cache_bytes: int = 256 << 20
    """Byte budget of the conditioning cache; 0 disables it."""
    conditioning_cache_policy: str = "lru"
    """Eviction policy of the conditioning cache: ``fifo``, ``lru`` or ``lfu``."""
    step_cache: str | None = None
    """Step cache: ``None`` (off) or ``first_block``."""
    step_cache_threshold: float = 0.08
    """First-block cache: reuse the cached residual while the relative L1 change of the first block's output
    since the last fully computed step stays below this value."""

    def __post_init__(self) -> None:
        owner = "DiTCacheConfig"
        _require(self.conditioning_cache_bytes >= 0, f"{owner}.conditioning_cache_bytes", "an integer >= 0")
        _require_choice(self.conditioning_cache_policy, f"{owner}.conditioning_cache_policy", CACHE_POLICIES)
        _require_choice(self.step_cache, f"{owner}.step_cache", (None, *STEP_CACHES))
        _require(self.step_cache_threshold > 0, f"{owner}.step_cache_threshold", "a number > 0")


@dataclass
class DiTConfig:
    """How a DiT stage loads its model and serves requests.

    Per-request values (steps, guidance, size, sampler) default to the fields here; a field left ``None``
    falls back to the model family's default.
    """

    revision: str | None = None
    """Hub revision (branch, tag or commit) of the stage's ``model_path`` when it is a hub repo id
    (``None``: ``main``); unused for a local folder."""
    executor: str = "auto"
    """What runs the pipeline: ``native`` (the step-level engine: native families only, see ``model_type``),
    ``diffusers`` (the pipeline's own ``__call__``, request-level batching: any diffusers pipeline) or
    ``auto`` (native for the native families' pipelines, diffusers for every other)."""
    use_diffusers: bool | None = None
    """Alias of ``executor``: ``True`` is ``diffusers``, ``False`` is ``native``, ``None`` (default) leaves
    ``executor`` as it is; a value that contradicts ``executor`` is an error."""
    model_type: str = "auto"
    """Native model family (``sd3``, ``z_image``) or ``auto`` to pick it from ``model_index.json``; a family
    named here means the native executor."""
    scheduler: str | None = None
    """Default sampler: a diffusers scheduler class name the model supports (``None``: the folder's)."""
    num_inference_steps: int | None = None
    """Default number of denoising steps."""
    guidance_scale: float | None = None
    """Default classifier-free guidance scale."""
    height: int | None = None
    """Default image height in pixels."""
    width: int | None = None
    """Default image width in pixels."""
    max_height: int = 2048
    """Largest height a request may ask for."""
    max_width: int = 2048
    """Largest width a request may ask for."""
    dtype: str = "float32"
    """Weights and activations dtype: ``float32``, ``bfloat16`` or ``float16``."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available)."""
    max_batch_size: int = 8
    """Most requests denoised together (the running batch)."""
    memory_budget: int | None = None
    """Bytes of device memory the running batch's working tensors may take: a request joins the batch only
    while the estimates of the running requests and its own stay within it (``vllm_omni.diffusion.memory``;
    a request over it alone is refused). ``None``: the batch is bounded by ``max_batch_size`` alone. On a
    GPU shared with ``ar`` stages the pipeline reserves this much for the batch (docs/features/
    omni_pipelines.md, "One GPU for AR and DiT stages")."""
    max_waiting_requests: int = 1024
    """Most requests queued behind the running batch; more are refused."""
    attention_backend: str = "sdpa"
    """``sdpa`` (PyTorch scaled-dot-product attention) or ``xformers`` (CUDA installs only)."""
    compile: str = "auto"
    """Native executor: compile the transformer's repeated blocks with ``torch.compile`` (inductor), the
    running batch padded to bucket sizes 1, 2, 4, ... up to twice ``max_batch_size`` rows, each warmed up
    at start. ``on``, ``off``, or ``auto``: on for CUDA, off for CPU (where the warm-up outweighs the gain;
    docs/features/dit_engine.md, "Compiled blocks"). Where compiling fails the stage runs eagerly and
    warns once."""
    cache: DiTCacheConfig = field(default_factory=DiTCacheConfig)
    """Conditioning and step caches."""

    def __post_init__(self) -> None:
        if isinstance(self.cache, dict):
            self.cache = DiTCacheConfig(**self.cache)
        _require_choice(self.dtype, "DiTConfig.dtype", DTYPES)
        _require_choice(self.device, "DiTConfig.device", DEVICES)
        _require_choice(self.attention_backend, "DiTConfig.attention_backend", ATTENTION_BACKENDS)
        _require_choice(self.compile, "DiTConfig.compile", COMPILE_MODES)
        self._check_executor()
        for name in ("max_height", "max_width", "max_batch_size", "max_waiting_requests"):
            _require(getattr(self, name) >= 1, f"DiTConfig.{name}", "an integer >= 1")
        if self.memory_budget is not None:
            _require(self.memory_budget >= 1, "DiTConfig.memory_budget", "a number of bytes >= 1 or None")
        if self.num_inference_steps is not None:
            _require(self.num_inference_steps >= 1, "DiTConfig.num_inference_steps", "an integer >= 1")
        if self.guidance_scale is not None:
            _require(self.guidance_scale >= 0, "DiTConfig.guidance_scale", "a number >= 0")

    def _check_executor(self) -> None:
        """Validate ``executor``, fold the ``use_diffusers`` alias into it, refuse contradictions."""
        _require_choice(self.executor, "DiTConfig.executor", EXECUTORS)
        _require_choice(self.use_diffusers, "DiTConfig.use_diffusers", (None, True, False))
        if self.use_diffusers is not None:
            alias = "diffusers" if self.use_diffusers else "native"
            if self.executor not in ("auto", alias):
                raise ValueError(
                    f"DiTConfig.use_diffusers={self.use_diffusers} (executor {alias!r}) contradicts "
                    f"executor={self.executor!r}; set executor alone"
                )
            self.executor = alias
        if self.executor == "diffusers" and self.model_type != "auto":
            raise ValueError(
                f"DiTConfig.model_type={self.model_type!r} names a native family; executor 'diffusers' runs "
                "the pipeline model_index.json names (leave model_type 'auto')"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiTConfig:
        """Build from a plain dict (YAML), naming any unknown key."""
        return from_known_keys(cls, values, "DiTConfig: unknown key(s)")

    def torch_dtype(self):
        """The ``torch.dtype`` of :attr:`dtype`."""
        import torch

        return getattr(torch, self.dtype)

    def torch_device(self) -> str:
        """The device the stage runs on, with ``auto`` resolved."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def compile_on(self) -> bool:
        """Whether the native executor compiles its blocks: :attr:`compile` with ``auto`` resolved."""
        if self.compile != "auto":
            return self.compile == "on"
        return self.torch_device() == "cuda"


def _require(ok: bool, name: str, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}")


def _require_choice(value: Any, name: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
