"""``MMEmbeddingCapturer`` on its own: which items it copies, and that copies are compact.

The runner here is a plain namespace with the few attributes the capturer reads (the real model runner
is exercised by the engine tests); it lets the test see the worker-side tensors, which engine tests
cannot: a capture that kept a view of the encoder's batch output would ship the whole batch.
"""

from types import SimpleNamespace

import torch
from vllm import SamplingParams

from vllm_omni.v1.worker.mm_embedding_capture import MMEmbeddingCapturer


def feature(identifier: str, offset: int, modality: str = "image"):
    return SimpleNamespace(
        identifier=identifier, modality=modality, mm_position=SimpleNamespace(offset=offset)
    )


def runner_with(batch_output: torch.Tensor, **extra_args):
    items = torch.split(batch_output, 16)  # what LLaVA's embed_multimodal returns: views of one batch
    request = SimpleNamespace(
        mm_features=[feature("h0", 2), feature("h1", 20), feature("h2", 40, modality="audio")],
        num_computed_tokens=0,
        sampling_params=SamplingParams(extra_args={"mm_embedding": extra_args} if extra_args else None),
    )
    cache = {"h0": items[0], "h1": items[1], "h2": items[2]}
    return SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=["r"]), requests={"r": request}, encoder_cache=cache
    )


def step(capturer, runner, num_tokens: int):
    capturer.after_gather(runner, SimpleNamespace(num_scheduled_tokens={"r": num_tokens}))
    runner.requests["r"].num_computed_tokens += num_tokens
    return capturer.take()


def test_copies_each_item_once_when_reached_and_compact():
    batch = torch.randn(48, 8)
    capturer, runner = MMEmbeddingCapturer(), runner_with(batch)
    first = step(capturer, runner, 10)  # reaches item 0 (offset 2) only
    assert [(index, modality) for index, modality, _ in first["r"]] == [(0, "image")]
    second = step(capturer, runner, 40)  # reaches items 1 and 2
    assert [index for index, _, _ in second["r"]] == [1, 2]
    assert step(capturer, runner, 10) is None  # nothing new: nothing sent twice
    for _, _, tensor in first["r"] + second["r"]:
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, "a view of the batch would ship it all"
    torch.testing.assert_close(second["r"][0][2], batch[16:32], atol=0, rtol=0)


def test_options_filter_and_pool_and_free_forgets():
    capturer, runner = (
        MMEmbeddingCapturer(),
        runner_with(torch.randn(48, 8), modalities=["audio"], pooling="mean"),
    )
    sent = step(capturer, runner, 60)
    assert [(index, modality, tuple(t.shape)) for index, modality, t in sent["r"]] == [(2, "audio", (1, 8))]
    assert capturer.num_tracked() == 1
    capturer.free(["r"])
    assert capturer.num_tracked() == 0
