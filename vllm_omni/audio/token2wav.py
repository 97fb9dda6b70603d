"""Qwen2.5-Omni's token2wav from a checkpoint folder, driven in batches: transformers' own modules.

The folder's ``config.json`` gives ``token2wav_config``; its safetensors give the weights under the
``token2wav.`` prefix; ``spk_dict.pt`` gives the voices (the DiT's speaker vector ``cond`` and reference mel
``ref_mel``). transformers' ``Qwen2_5OmniToken2WavDiTModel.sample`` draws one noise tensor for its whole
batch from the global generator; :meth:`Token2Wav.mel` integrates the same ODE (transformers'
``RungeKutta4ODESolver`` over the DiT's ``forward``, with classifier-free guidance and the swayed time
points of ``sample``) from noise each request drew with its own generator, so batch companions change
nothing.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch

from vllm_omni.transformers_utils.safetensors_files import files_holding

PREFIX = "token2wav."
"""Where the token2wav weights are in a Qwen2.5-Omni checkpoint."""


class Token2Wav:
    """The DiT (codes -> mel) and BigVGAN (mel -> waveform) of a Qwen2.5-Omni folder, float32, and its
    voices."""

    def __init__(self, model_path: str | Path) -> None:
        from transformers import Qwen2_5OmniConfig, Qwen2_5OmniToken2WavModel

        folder = Path(model_path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"model_path must be a Qwen2.5-Omni checkpoint folder, got {model_path!r}")
        self.model = Qwen2_5OmniToken2WavModel(Qwen2_5OmniConfig.from_pretrained(folder).token2wav_config)
        self.model.load_state_dict(_token2wav_weights(folder))
        self.model.float().eval()
        self.dit, self.vocoder = self.model.code2wav_dit_model, self.model.code2wav_bigvgan_model
        self.voices = torch.load(folder / "spk_dict.pt", weights_only=True)
        defaults = inspect.signature(Qwen2_5OmniToken2WavModel.forward).parameters
        self.num_steps, self.guidance_scale, self.sway_coefficient = (
            defaults[name].default for name in ("num_steps", "guidance_scale", "sway_coefficient")
        )

    @property
    def repeats(self) -> int:
        """Mel frames per code."""
        return self.dit.config.repeats

    @property
    def block_codes(self) -> int:
        """Codes per block of the DiT's block attention."""
        return self.dit.config.block_size // self.repeats

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (BigVGAN's upsampling)."""
        return math.prod(self.vocoder.config.upsample_rates)

    def noise(self, num_codes: int, generator: torch.Generator) -> torch.Tensor:
        """A request's initial noise, (1, frames, mel_dim): what ``sample`` draws after
        ``torch.manual_seed(seed)`` for one request of ``num_codes`` codes."""
        return torch.randn((1, num_codes * self.repeats, self.dit.mel_dim), generator=generator)

    @torch.inference_mode()
    def mel(
        self, codes: torch.Tensor, voices: list[str], noise: torch.Tensor, num_steps: int
    ) -> torch.Tensor:
        """Mel spectrograms (batch, mel_dim, frames) of ``codes`` (batch, n) in ``voices``, integrated from
        ``noise`` (batch, n x repeats, mel_dim) over ``num_steps`` time points."""
        cond = torch.cat([self.voices[voice]["cond"] for voice in voices]).float()
        ref_mel = torch.cat([self.voices[voice]["ref_mel"] for voice in voices]).float()
        speaker = cond.unsqueeze(1).repeat(1, noise.shape[1], 1)
        guided = self.guidance_scale >= 1e-5  # sample()'s threshold for running without guidance

        def velocity(time: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            output = self.dit(
                hidden_states=state, condition_vector=ref_mel, speaker_embedding=speaker,
                quantized_code=codes, time_step=time, apply_cfg=guided,
            )  # fmt: skip
            if not guided:
                return output
            conditioned, unconditioned = output.chunk(2, dim=0)
            return conditioned + (conditioned - unconditioned) * self.guidance_scale

        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

        times = torch.linspace(0, 1, num_steps)
        times += self.sway_coefficient * (torch.cos(torch.pi / 2 * times) - 1 + times)
        return RungeKutta4ODESolver(velocity, noise).integrate(times)[-1].permute(0, 2, 1)

    @torch.inference_mode()
    def waveform(self, mel: torch.Tensor) -> torch.Tensor:
        """BigVGAN's waveforms (batch, frames x samples_per_frame) of ``mel`` (batch, mel_dim, frames)."""
        return self.vocoder(mel).reshape(mel.shape[0], -1)


def _token2wav_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The ``token2wav.`` tensors of the folder's safetensors (sharded or not), prefix removed."""
    from safetensors import safe_open

    weights = {}
    for file in files_holding(folder, PREFIX):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                if key.startswith(PREFIX):
                    weights[key.removeprefix(PREFIX)] = handle.get_tensor(key)
    if not weights:
        raise ValueError(f"{folder} holds no {PREFIX}* weights: not a Qwen2.5-Omni checkpoint with token2wav")
    return weights
