"""Tiny diffusers pipelines without a native family (sd2, pixart_sigma, flux): deterministic folders of the
pipeline classes and schedulers they stand for."""

from pathlib import Path

import pytest
from diffusers import DiffusionPipeline

from tests.testing.test_tiny_dit import digest
from vllm_omni.testing import tiny_models

EXPECTED = {  # name: pipeline class, scheduler class, scheduler config values
    "sd2": ("StableDiffusionPipeline", "DDIMScheduler", {"prediction_type": "v_prediction"}),
    "pixart_sigma": ("PixArtSigmaPipeline", "DPMSolverMultistepScheduler", {"prediction_type": "epsilon"}),
    "flux": ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builds_are_deterministic_and_load_as_their_pipeline(tmp_path, name):
    cached = Path(tiny_models.tiny_model_path(name))
    tiny_models.TINY_MODELS[name](tmp_path)
    assert digest(tmp_path) == digest(cached)
    pipe = DiffusionPipeline.from_pretrained(cached)
    pipeline_class, scheduler_class, scheduler_config = EXPECTED[name]
    assert (type(pipe).__name__, type(pipe.scheduler).__name__) == (pipeline_class, scheduler_class)
    assert scheduler_config.items() <= dict(pipe.scheduler.config).items()
