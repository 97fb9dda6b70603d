"""Multimodal Qwen3 on a real CPU engine: greedy parity with transformers, caching, errors, mm_embedding.

One engine (through ``MultimodalQwen3Pipeline``) serves every test of the module: float32, block size 32,
``enable_return_mm_embedding`` on (requests that check prefix caching opt out of it).
"""

import pytest
import torch
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_omni import MultimodalQwen3Pipeline
from vllm_omni.testing.tiny_models import MM_QWEN3_MODALITIES, tiny_model_path
from vllm_omni.transformers_utils.multimodal_qwen3 import MultimodalQwen3HF

pytestmark = pytest.mark.engine

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
NO_CAPTURE = {"mm_embedding": {"enabled": False}}
BLOCK = 32
LONG_TEXT = " The cat sat on the mat. The dog ran in the park." * 4  # 56 tokens


def emb(modality: str, *rows: int, seed: int) -> list[torch.Tensor]:
    """Items of ``modality``: a 1-D tensor for rows=0, else (rows, width)."""
    g = torch.Generator().manual_seed(seed)
    width = MM_QWEN3_MODALITIES[modality]
    return [torch.randn(*((n,) if n else ()), width, generator=g) for n in rows]


def request(text: str, items: dict) -> dict:
    return {"prompt": text, "multi_modal_data": {"multimodal_embeddings": items}}


@pytest.fixture(scope="module")
def path() -> str:
    return tiny_model_path("multimodal_qwen3")


@pytest.fixture(scope="module")
def reference(path) -> MultimodalQwen3HF:
    return MultimodalQwen3HF.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tokenizer(path):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def pipeline(path):
    pipe = MultimodalQwen3Pipeline(
        path, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8, block_size=BLOCK,
        enforce_eager=True, enable_return_mm_embedding=True,
    )  # fmt: skip
    yield pipe
    pipe.llm.llm_engine.engine_core.shutdown()


# (prompt, items): placeholders in the text, none (items first, in the request's order), 1-D and 2-D items.
MIXES = [
    ("Hello <|audio|> and <|vision|> world",
     {"audio": emb("audio", 3, seed=1), "vision": emb("vision", 0, seed=2)}),
    ("Describe the image in one sentence.",
     {"vision": emb("vision", 2, 0, seed=3), "audio": emb("audio", 0, seed=4)}),
    ("The cat <|audio|> sat on <|audio|> the mat.", {"audio": emb("audio", 5, 0, seed=5)}),
    ("<|vision|><|vision|><|vision|> three views", {"vision": emb("vision", 1, 4, 0, seed=6)}),
    ("Only <|audio|> placed; vision goes first.",
     {"audio": emb("audio", 2, seed=7), "vision": emb("vision", 0, seed=8)}),
]  # fmt: skip


def test_greedy_matches_transformers_for_mixes_in_one_batch(pipeline, reference, tokenizer):
    outputs = pipeline.llm.generate([request(text, items) for text, items in MIXES], GREEDY)
    for (text, items), output in zip(MIXES, outputs, strict=True):
        ids = tokenizer(text).input_ids
        assert output.prompt_token_ids == reference.expand_placeholders(ids, items)
        assert list(output.outputs[0].token_ids) == reference.greedy(ids, items, MAX_TOKENS), text


def test_modalities_as_top_level_keys_and_numpy_items(pipeline):
    text, items = MIXES[0]
    nested = pipeline.llm.generate(request(text, items), GREEDY)[0]
    flat = {"prompt": text, "multi_modal_data": {k: [t.numpy() for t in v] for k, v in items.items()}}
    assert pipeline.llm.generate(flat, GREEDY)[0].outputs[0].token_ids == nested.outputs[0].token_ids


def test_pipeline_generate_text(pipeline, reference, tokenizer):
    text, items = MIXES[2]
    inputs = {"text": text, "multimodal_data": {"multimodal_embeddings": items}}
    expected = tokenizer.decode(reference.greedy(tokenizer(text).input_ids, items, MAX_TOKENS))
    assert pipeline.generate(inputs, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True) == expected
    both = pipeline.generate([inputs, inputs], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert both == [expected, expected]
    with pytest.raises(
        ValueError, match=r"unknown input key\(s\) \['prompt'\]; allowed: text, multimodal_data"
    ):
        pipeline.generate({"prompt": text})


def test_returned_mm_embedding_is_the_projected_items(pipeline, reference):
    text, items = MIXES[0]
    completion = pipeline.llm.generate(request(text, items), GREEDY)[0].outputs[0]
    with torch.no_grad():
        expected = torch.cat(
            [reference.multi_modal_projectors["audio"](items["audio"][0]),
             reference.multi_modal_projectors["vision"](items["vision"][0][None])]
        )  # fmt: skip
    assert [(i.modality, i.length) for i in completion.mm_embedding_items] == [("audio", 3), ("vision", 1)]
    torch.testing.assert_close(completion.mm_embedding, expected, atol=1e-5, rtol=1e-5)


def cached_tokens(pipeline, text: str, items: list[torch.Tensor]) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=1, extra_args=NO_CAPTURE)
    return pipeline.llm.generate(request(text, {"audio": items}), params)[0].num_cached_tokens


def test_prefix_cache_reuses_identical_embeddings_only(pipeline, tokenizer):
    text = LONG_TEXT + " <|audio|>" + LONG_TEXT
    ids = tokenizer(text).input_ids
    first, other = emb("audio", 4, seed=11), emb("audio", 4, seed=12)
    text_blocks = ids.index(tokenizer.convert_tokens_to_ids("<|audio|>")) // BLOCK * BLOCK
    assert text_blocks > 0
    assert cached_tokens(pipeline, text, first) == 0
    # Same embeddings: every full block is reused (vLLM recomputes the last token).
    assert cached_tokens(pipeline, text, first) == (len(ids) + 3 - 1) // BLOCK * BLOCK
    # Other embeddings: only the text blocks before the item are shared.
    assert cached_tokens(pipeline, text, other) == text_blocks
    # The same values in another dtype are other embeddings too.
    assert cached_tokens(pipeline, text, [first[0].half()]) == text_blocks


AUDIO = emb("audio", 1, seed=0)
BAD_INPUTS = [
    ({"speech": AUDIO}, "x", r"unknown modality 'speech'; this model takes audio, vision"),
    ({"audio": [torch.randn(2, 23)]}, "x", r"\[0\] has shape \(2, 23\); allowed: \(24,\) or \(n, 24\)"),
    ({"vision": [torch.ones(16, dtype=torch.int64)]}, "x", r"dtype torch.int64; allowed: float32"),
    ({"audio": [torch.full((24,), float("nan"))]}, "x", r"\['audio'\]\[0\] contains NaN or Inf"),
    ({"audio": [torch.tensor([float("inf")] * 24)]}, "x", r"contains NaN or Inf"),
    ({"audio": AUDIO}, "<|audio|><|audio|>", r"2 <\|audio\|> placeholder\(s\) but .* 1 'audio'"),
    ({"audio": AUDIO * 2}, "<|audio|>", r"1 <\|audio\|> placeholder\(s\) but .* 2 'audio'"),
    ({"audio": AUDIO}, "<|vision|>", r"1 <\|vision\|> placeholder\(s\) but .* 0 'vision'"),
    ({"audio": []}, "x", r"\['audio'\] must be a non-empty list of tensors"),
    ({"audio": ["not a tensor"]}, "x", r"must be a torch.Tensor or numpy array, got str"),
    ([AUDIO], "x", r"must be a dict: modality name -> tensors"),
]  # fmt: skip


@pytest.mark.parametrize(("items", "text", "message"), BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_engine_keeps_serving(pipeline, items, text, message):
    with pytest.raises(ValueError, match=message):
        pipeline.llm.generate(request(text, items), GREEDY)
    text, items = MIXES[0]
    assert len(pipeline.llm.generate(request(text, items), GREEDY)[0].outputs[0].token_ids) == MAX_TOKENS


def test_prompt_over_max_model_len_is_rejected(pipeline):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"longer than the maximum model length of 256"):
        pipeline.llm.generate(request("<|audio|> hi", {"audio": emb("audio", 300, seed=0)}), GREEDY)
