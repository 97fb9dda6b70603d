"""What a DiT stage accepts, as plain data: the one request validator of both DiT engines.

The native engine and the diffusers executor each publish a ``DiTLimits`` (``engine.limits``) and run every
request through it when it is added. The object needs neither torch, diffusers nor the model, so a pipeline
manager in another process can check the sampling parameters of every stage before the first stage computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_omni.config.dit import DiTConfig
    from vllm_omni.diffusion.request import DiffusionSamplingParams

_NO_LATENTS_IN = (
    "the diffusers executor runs whole pipeline calls (no latents in, no cut schedule); the native engine "
    "(DiTConfig.executor='native') serves it"
)


@dataclass(frozen=True)
class DiTLimits:
    """The sizes, samplers, outputs and queue bound of one DiT stage (picklable, torch-free)."""

    name: str
    """Model family (``sd3``) or pipeline class that serves the stage, for messages."""
    size_factor: int
    """Image height and width must be multiples of this (1: any size, the pipeline checks its own)."""
    max_height: int
    """Largest height a request may run at (``DiTConfig.max_height``)."""
    max_width: int
    """Largest width a request may run at (``DiTConfig.max_width``)."""
    height: int | None
    """The stage's default height (``DiTConfig.height``); None: the prompt's image or the model decides."""
    width: int | None
    """The stage's default width (``DiTConfig.width``); None: the prompt's image or the model decides."""
    samplers: tuple[str, ...]
    """Sampler names a request may pick; empty: the stage runs the folder's own scheduler, leave it unset."""
    step_level: bool
    """Whether the stage runs the native step-level engine, the one that serves ``return_latents``,
    ``partial_images`` and latents in (``latents``, ``denoising_start``, ``denoising_end``;
    ``output_type="latent"`` is always served)."""
    max_batch_size: int
    """Most requests run together (``DiTConfig.max_batch_size``)."""
    max_waiting_requests: int
    """Most requests queued behind a full batch (``DiTConfig.max_waiting_requests``)."""
    model_max_size: int | None = None
    """Largest height and width the model itself takes (e.g. SD3's position embedding); None: no limit."""
    inpainting: bool = False
    """Whether a request may bring a ``mask_image`` with its init image (the native families; a diffusers
    pipeline with an inpainting pipeline of its family)."""

    @classmethod
    def from_config(
        cls,
        config: DiTConfig,
        name: str,
        size_factor: int,
        samplers: tuple[str, ...],
        step_level: bool,
        model_max_size: int | None = None,
        inpainting: bool = False,
    ) -> DiTLimits:
        """The limits of a stage configured by ``config`` whose model sets the other fields."""
        return cls(
            name=name, size_factor=size_factor, max_height=config.max_height, max_width=config.max_width,
            height=config.height, width=config.width, samplers=tuple(samplers), step_level=step_level,
            max_batch_size=config.max_batch_size, max_waiting_requests=config.max_waiting_requests,
            model_max_size=model_max_size, inpainting=inpainting,
        )  # fmt: skip

    @property
    def max_num_requests(self) -> int:
        """Requests the stage holds at most, running and waiting: what a caller may keep in flight to it."""
        return self.max_batch_size + self.max_waiting_requests

    def check_params(self, params: DiffusionSamplingParams) -> None:
        """Refuse (``ValueError`` naming the field) parameters this stage would refuse whatever the prompt:
        the size asked for or configured, the sampler, ``return_latents``, ``partial_images``,
        ``denoising_start`` / ``denoising_end``."""
        self.check_size(params.height or self.height, params.width or self.width)
        if params.sampler is not None:
            self.check_sampler(params.sampler)
        if params.return_latents and not self.step_level:
            raise ValueError(
                f"return_latents is not available with the diffusers executor ({self.name}); use "
                "output_type='latent'"
            )
        if params.partial_images and not self.step_level:
            raise ValueError(
                f"partial_images is not available with the diffusers executor ({self.name}: it runs whole "
                "pipeline calls)"
            )
        for name in ("denoising_start", "denoising_end"):
            if getattr(params, name) is not None and not self.step_level:
                raise ValueError(f"{name}: {_NO_LATENTS_IN} ({self.name})")

    def check_request(
        self,
        params: DiffusionSamplingParams,
        has_image: bool,
        height: int | None = None,
        width: int | None = None,
        has_mask: bool = False,
        has_latents: bool = False,
    ) -> None:
        """The checks of a request whose prompt is known: ``check_params``, ``strength`` only with an init
        image or latents, latents only on the native engine and ``denoising_start`` only with them, a mask
        only where the stage inpaints, and the size it will run at when the engine resolves it (e.g. the
        init image's)."""
        self.check_params(params)
        if params.strength is not None and not (has_image or has_latents):
            raise ValueError(
                "strength is for image-to-image: pass the init image as prompt['image'] (or its latents as "
                "prompt['latents'])"
            )
        if has_latents and not self.step_level:
            raise ValueError(f"latents: {_NO_LATENTS_IN} ({self.name})")
        if params.denoising_start is not None and not has_latents:
            raise ValueError("denoising_start continues given latents: pass them as prompt['latents']")
        if has_mask:
            self.check_inpainting("mask_image")
        self.check_size(height, width)

    def check_inpainting(self, field: str) -> None:
        """Refuse a mask (the request's ``field``) when the stage does not inpaint."""
        if not self.inpainting:
            raise ValueError(
                f"{field}: {self.name} does not inpaint (diffusers has no inpainting pipeline for it); "
                "send no mask"
            )

    def check_size(self, height: int | None, width: int | None) -> None:
        """Refuse a height or width that is not a multiple of ``size_factor`` or above the maximum (None:
        not known yet, not checked)."""
        factor = self.size_factor
        for name, value, limit in (("height", height, self.max_height), ("width", width, self.max_width)):
            if value is None:
                continue
            if value % factor:
                raise ValueError(f"{name} must be a multiple of {factor} for {self.name}, got {value}")
            if value > limit:
                raise ValueError(f"{name} {value} exceeds the stage's maximum (DiTConfig.max_{name}={limit})")
            if self.model_max_size is not None and value > self.model_max_size:
                raise ValueError(f"{name} {value} exceeds what {self.name} takes ({self.model_max_size})")

    def check_sampler(self, sampler: str, field: str = "sampler") -> None:
        """Refuse a sampler this stage cannot run; ``field`` names where it was set."""
        if not self.samplers:
            raise ValueError(
                f"{field}: the diffusers executor runs the folder's own scheduler; leave it unset"
            )
        if sampler not in self.samplers:
            allowed = list(self.samplers)
            raise ValueError(f"{field} {sampler!r} is not supported by {self.name}; allowed: {allowed}")

    def check_room(self, num_requests: int) -> None:
        """Refuse one more request when the stage already holds ``num_requests`` >= ``max_num_requests``."""
        if num_requests >= self.max_num_requests:
            raise ValueError(
                f"the waiting queue is full: the stage holds {num_requests} requests (DiTConfig."
                f"max_batch_size {self.max_batch_size} + max_waiting_requests {self.max_waiting_requests}); "
                "retry later"
            )
