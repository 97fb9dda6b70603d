"""Compiled transformer blocks (DiTConfig.compile): equal to eager, padding rows change no real row, the
step cache on top, the eager fallback (tiny pipelines on CPU, inductor, 32x32)."""

from __future__ import annotations

import logging
from logging.handlers import BufferingHandler

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from tests.diffusion.conftest import FAMILIES, GUIDANCE, run_all
from tests.diffusion.test_dit_engine import PROMPTS, init_image
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion import compiled_blocks
from vllm_omni.diffusion.compiled_blocks import BucketedForward, batch_buckets
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine

CAPTIONS = ("a", PROMPTS[1], "word " * 30, "word " * 50, "word " * 90)
"""Captions of 11 to about 200 tokens: Z-Image pads them to 1 to 7 blocks of 32, so each is a new length."""
WARM_UP_SIZE = {"sd3": 32, "z_image": 16}
"""The stage's default size (SD3), the smallest image (Z-Image: graphs generic in its token count)."""
TOLERANCE = 1e-4
"""Largest pixel difference (0..1, float32) called equal; measured ~1e-6 (docs/features/dit_engine.md)."""


def engine(family: str, compile: str, **config) -> DiffusionEngine:
    """Two requests a step at most: rows 1..4, buckets 1, 2, 4, warmed up at 32x32."""
    return DiffusionEngine(
        tiny_model_path(family), DiTConfig(height=32, width=32, max_batch_size=2, compile=compile, **config)
    )


def requests(family: str) -> list[tuple]:
    """Guided text-to-image, unguided text-to-image and guided image-to-image: 2 + 1 rows = 3, padded to 4."""
    g = GUIDANCE[family]
    return [
        ("t2i", PROMPTS[0], Params(num_inference_steps=4, guidance_scale=g, seed=1, output_type="np")),
        ("unguided", PROMPTS[1], Params(num_inference_steps=3, guidance_scale=0.0, seed=2, output_type="np")),
        ("i2i", {"prompt": PROMPTS[2], "image": init_image(32, 1)},
         Params(num_inference_steps=5, guidance_scale=g, seed=3, strength=0.8, output_type="np")),
    ]  # fmt: skip


def serve(engine: DiffusionEngine, batch: list[tuple]) -> dict[str, np.ndarray]:
    for request in batch:
        engine.add_request(*request)
    return {request_id: output.images for request_id, output in run_all(engine).items()}


def test_batch_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)


def test_padding_rows_are_dropped_and_never_seen_by_real_rows():
    """Batch-first tensors are padded with their last row to the bucket, the output trimmed back; other
    arguments (a scalar, a tensor of another first size, None) pass as they are."""
    seen = []

    def block(hidden, temb, scale, other, none=None):
        seen.append((hidden.shape[0], temb.shape[0], other.shape[0]))
        return hidden * scale + temb, hidden.sum(dim=1)

    hidden, temb, other = torch.randn(3, 5), torch.randn(3, 1), torch.randn(7)
    forward = BucketedForward(block, block, (1, 2, 4))
    out = forward(hidden, temb, 2.0, other, none=None)
    assert seen == [(4, 4, 7)]
    torch.testing.assert_close(out, block(hidden, temb, 2.0, other), rtol=0, atol=0)
    assert forward(torch.randn(5, 5), torch.randn(5, 1), 1.0, other)[0].shape == (5, 5)  # above: eager
    assert seen[-1] == (5, 5, 7)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiled_blocks, "BACKEND", failing_backend)
    with caplog.at_level(logging.WARNING, logger="vllm_omni"):
        eager = engine("sd3", "on")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "compiling the transformer blocks failed, they run eagerly" in warnings[0]
    assert "no C++ compiler here" in warnings[0]
    assert eager.runner.compiled is None
    assert all("forward" not in vars(block) for block in eager.runner.family.transformer.transformer_blocks)
    assert serve(eager, requests("sd3")[1:2])["unguided"].std() > 0.01


@pytest.fixture(scope="module", params=FAMILIES)
def engines(request) -> tuple[DiffusionEngine, DiffusionEngine, str]:
    """A compiled and an eager engine of one family, and the compiled one's log at start."""
    logs, package = BufferingHandler(capacity=1000), logging.getLogger("vllm_omni")
    package.addHandler(logs)
    try:
        compiled = engine(request.param, "on")
    finally:
        package.removeHandler(logs)
    return compiled, engine(request.param, "off"), "\n".join(r.getMessage() for r in logs.buffer)


def test_compiled_equals_eager_and_padding_keeps_rows(engines):
    """Text-to-image and image-to-image batched (3 rows in a bucket of 4) equal the eager engine's images;
    a request alone equals itself in the padded batch."""
    compiled, eager, log = engines
    family = compiled.runner.family.name
    size = WARM_UP_SIZE[family]
    assert f"compiled transformer blocks warmed up for batch sizes [1, 2, 4] at {size}x{size} in" in log
    assert compiled.runner.compiled is not None
    batch = requests(family)
    ours, theirs = serve(compiled, batch), serve(eager, batch)
    for request_id, image in theirs.items():
        assert np.abs(ours[request_id] - image).max() < TOLERANCE, request_id
    alone = serve(compiled, [batch[1]])["unguided"]
    assert np.abs(alone - ours["unguided"]).max() < TOLERANCE


def test_step_cache_on_compiled_blocks():
    """The first-block cache decides per row on compiled blocks (its subsets of rows padded to buckets):
    the same rows skipped and the same images as on eager blocks."""
    cache = {"step_cache": "first_block", "step_cache_threshold": 0.2}
    runs = {}
    for mode in ("on", "off"):
        eng = engine("sd3", mode, cache=cache)
        runs[mode] = serve(eng, requests("sd3")), eng.runner.step_cache
    (ours, ours_cache), (theirs, their_cache) = runs["on"], runs["off"]
    assert ours_cache.skipped == their_cache.skipped > 0
    assert ours_cache.computed == their_cache.computed
    for request_id, image in theirs.items():
        assert np.abs(ours[request_id] - image).max() < TOLERANCE, request_id


def test_new_caption_lengths_compile_no_new_graph(engines):
    """After the warm-up, captions of new lengths, alone (guided or not) and batched together (rows of
    different lengths: an attention mask), compile no new graph, and equal the eager engine's images.
    Z-Image's caption length changes its blocks' sequence length, and so does the image size (warmed up at
    16x16, served at 32x32); SD3 pads every caption to one length."""
    compiled, eager, _ = engines
    guidance = GUIDANCE[compiled.runner.family.name]

    def params(seed: int, guided: bool) -> Params:
        return Params(num_inference_steps=1, guidance_scale=guidance * guided, seed=seed, output_type="np")

    alone = [[(f"alone{i}", caption, params(i, i % 2 == 0))] for i, caption in enumerate(CAPTIONS)]
    mixed = [(f"mixed{i}", CAPTIONS[i], params(10 + i, i != 1)) for i in (0, 4, 2)]
    graphs = counters["stats"]["unique_graphs"]
    ours = [serve(compiled, batch) for batch in (*alone, mixed)]
    assert counters["stats"]["unique_graphs"] - graphs == 0
    for batch, images in zip((*alone, mixed), ours, strict=True):
        for request_id, image in serve(eager, batch).items():
            assert np.abs(images[request_id] - image).max() < TOLERANCE, request_id
