"""Tiny DiT folders and engines shared by the diffusion tests."""

from __future__ import annotations

import pytest

from vllm_omni.config.dit import DiTConfig
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine

FAMILIES = ("sd3", "z_image")
# Guidance on for both families (SD3: above 1; Z-Image: above 0).
GUIDANCE = {"sd3": 5.0, "z_image": 2.0}


@pytest.fixture(scope="session", params=FAMILIES)
def dit_family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def dit_path(dit_family) -> str:
    return tiny_model_path(dit_family)


@pytest.fixture(scope="session")
def dit_engine(dit_path) -> DiffusionEngine:
    return DiffusionEngine(dit_path, DiTConfig(max_batch_size=4, max_waiting_requests=8))


@pytest.fixture(scope="session")
def diffusers_pipes(dit_path):
    """The diffusers reference pipelines (text-to-image, image-to-image) on the same folder."""
    import diffusers

    t2i = diffusers.DiffusionPipeline.from_pretrained(dit_path)
    i2i = getattr(diffusers, type(t2i).__name__.replace("Pipeline", "Img2ImgPipeline"))(**t2i.components)
    for pipe in (t2i, i2i):
        pipe.set_progress_bar_config(disable=True)
    return t2i, i2i


def run_all(engine: DiffusionEngine) -> dict:
    """Step the engine until it is idle; outputs by request id."""
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output
    return outputs
