"""Text conditioning given as tensors (``prompt_embeds``): the same images as from text, the checks, both
families, the diffusers executor, and plain diffusers on the same tensors (tiny real pipelines on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.diffusion.conftest import run_all
from tests.diffusion.test_dit_engine import init_image
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine, create_diffusion_engine

TEXTS = ("A beautiful landscape with mountains", "The cat sat on the mat", "a red sunset")
SMALL = dict(height=32, width=32, num_inference_steps=3, output_type="np")


@pytest.fixture(scope="module")
def z_engine() -> DiffusionEngine:
    return DiffusionEngine(tiny_model_path("z_image"), DiTConfig(max_batch_size=4, max_waiting_requests=8))


@pytest.fixture(scope="module")
def sd3_engine() -> DiffusionEngine:
    return DiffusionEngine(tiny_model_path("sd3"), DiTConfig(max_batch_size=4, max_waiting_requests=8))


@torch.inference_mode()  # as the runner encodes (SD3's encoders differ by ~3e-6 with autograd on)
def encode(engine: DiffusionEngine, text: str):
    return engine.runner.family.encode([text])[0]


def hf_hidden_states(text: str) -> torch.Tensor:
    """Z-Image's conditioning computed with transformers alone: the tiny qwen3 LM on the chat-templated
    prompt (as ZImagePipeline templates it), ``hidden_states[-2]`` of its tokens."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    path = tiny_model_path("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, enable_thinking=True, return_dict=False
    )
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-2][0]


def images(engine, requests: dict) -> dict:
    """Run ``{id: (prompt, params)}`` together; images by id."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, Params(**{**SMALL, **params}))
    outputs = run_all(engine)
    assert all(outputs[i].error is None for i in requests), {i: outputs[i].error for i in requests}
    return {i: outputs[i].images for i in requests}


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max())


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_z_image_embeds_make_the_text_image(z_engine, guidance):
    """``prompt_embeds`` = the family's ``encode`` of the text: bitwise the text's image (guided: the negative
    prompt text is encoded by the stage, or given as ``negative_prompt_embeds``). With transformers' own
    hidden states (no padding): within float noise."""
    text, negative = TEXTS[0], "blurry"
    embeds, hf = encode(z_engine, text), hf_hidden_states(text)
    hidden_size = z_engine.runner.family.pipe.text_encoder.config.hidden_size
    assert hf.shape == embeds.shape and hf.shape[1] == hidden_size
    assert torch.allclose(hf, embeds, atol=1e-5)
    prompts = {
        "text": {"prompt": text, "negative_prompt": negative},
        "embeds": {"prompt_embeds": embeds, "negative_prompt": negative},
        "both_embeds": {"prompt_embeds": embeds, "negative_prompt_embeds": encode(z_engine, negative)},
        "float64": {"prompt_embeds": embeds.double(), "negative_prompt": negative},  # cast to float32
        "hf": {"prompt_embeds": hf, "negative_prompt": negative},
    }
    params = dict(seed=7, guidance_scale=guidance)
    out = {key: images(z_engine, {key: (prompt, params)})[key] for key, prompt in prompts.items()}  # alone
    for key in ("embeds", "both_embeds", "float64"):
        assert np.array_equal(out[key], out["text"]), key
    assert max_diff(out["hf"], out["text"]) < 1e-4
    assert out["text"].std() > 0.01


def test_mixed_batch_equals_solo_runs(z_engine):
    """Text and tensor requests of other lengths, seeds, steps and guidance, arriving at other times, share
    forwards; each image is its text request's image alone."""
    cases = [
        (TEXTS[0], dict(seed=1, guidance_scale=2.0)),
        ({"prompt_embeds": encode(z_engine, TEXTS[1])}, dict(seed=2, guidance_scale=0.0)),
        ({"prompt_embeds": encode(z_engine, TEXTS[2]), "negative_prompt_embeds": encode(z_engine, "")},
         dict(seed=3, guidance_scale=3.0, num_inference_steps=4)),
    ]  # fmt: skip
    solo = [images(z_engine, {"solo": (TEXTS[i], params)})["solo"] for i, (_, params) in enumerate(cases)]
    z_engine.add_request("m0", cases[0][0], Params(**{**SMALL, **cases[0][1]}))
    outputs = {o.request_id: o for o in z_engine.step()}
    for i in (1, 2):  # join the running batch one step later
        z_engine.add_request(f"m{i}", cases[i][0], Params(**{**SMALL, **cases[i][1]}))
    outputs |= run_all(z_engine)
    for i in range(3):
        assert outputs[f"m{i}"].error is None
        assert max_diff(outputs[f"m{i}"].images, solo[i]) < 1e-5, i


def test_embeds_bypass_the_conditioning_cache(z_engine):
    """No cache key by text for tensors: unguided requests touch the cache not at all; guided ones look up
    only their negative prompt text."""
    cache, embeds = z_engine.runner.conditioning_cache, encode(z_engine, TEXTS[2])

    def lookups() -> int:
        return cache.stats.hits + cache.stats.misses

    before = lookups()
    images(z_engine, {"u": ({"prompt_embeds": embeds}, dict(seed=1, guidance_scale=0.0))})
    images(z_engine, {"n": ({"prompt_embeds": embeds, "negative_prompt_embeds": embeds}, dict(seed=1))})
    assert lookups() == before
    images(z_engine, {"g": ({"prompt_embeds": embeds}, dict(seed=1, guidance_scale=2.0))})
    assert lookups() == before + 1


SHAPE = r"prompt_embeds must have shape \(1\.\.512, 64\) for z_image"


def _z(shape, dtype=torch.float32, fill=0.1):
    return torch.full(shape, fill, dtype=dtype)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"prompt_embeds": _z((64,))}, SHAPE + r", got \(64,\)"),
        ({"prompt_embeds": _z((1, 5, 64))}, SHAPE + r", got \(1, 5, 64\)"),
        ({"prompt_embeds": _z((5, 32))}, SHAPE + r", got \(5, 32\)"),
        ({"prompt_embeds": _z((513, 64))}, SHAPE + r", got \(513, 64\)"),
        ({"prompt_embeds": _z((0, 64))}, SHAPE + r", got \(0, 64\)"),
        ({"prompt_embeds": _z((5, 64), torch.int64, 1)}, "prompt_embeds must be a floating-point tensor"),
        ({"prompt_embeds": _z((5, 64), fill=float("nan"))}, r"prompt_embeds must be finite"),
        ({"prompt": "x", "negative_prompt_embeds": _z((5, 64), fill=float("inf"))},
         r"negative_prompt_embeds must be finite"),
        ({"prompt_embeds": _z((5, 64), torch.float64, 1e300)},  # finite, but not in float32
         r"prompt_embeds must be finite in the stage's dtype torch.float32"),
        ({"prompt_embeds": [[0.1] * 64] * 5}, "prompt_embeds must be a torch.Tensor, got list"),
        ({"prompt_embeds": np.zeros((5, 64), np.float32)},
         "prompt_embeds must be a torch.Tensor, got ndarray"),
        ({"prompt": "x", "prompt_embeds": _z((5, 64))}, "give prompt or prompt_embeds, not both"),
        ({"prompt_embeds": _z((5, 64)), "negative_prompt": "y", "negative_prompt_embeds": _z((5, 64))},
         "give negative_prompt or negative_prompt_embeds, not both"),
        ({"negative_prompt_embeds": _z((5, 64))},
         r"prompt \(a string\) or prompt_embeds \(tensors\) is required"),
        ({"prompt": "x", "pooled_prompt_embeds": _z((96,))},
         "pooled_prompt_embeds is only taken together with prompt_embeds"),
        ({"prompt_embeds": _z((5, 64)), "pooled_prompt_embeds": _z((96,))},
         r"pooled_prompt_embeds is not used by z_image; its tensor keys are \['prompt_embeds', "),
    ],
)  # fmt: skip
def test_bad_embeds_are_refused_and_running_requests_carry_on(z_engine, prompt, message):
    z_engine.add_request("running", {"prompt_embeds": encode(z_engine, "x")}, Params(**SMALL, seed=1))
    z_engine.step()
    with pytest.raises(ValueError, match=message):
        z_engine.add_request("bad", prompt, Params(**SMALL, seed=2))
    z_engine.add_request("good", {"prompt_embeds": encode(z_engine, "y")}, Params(**SMALL, seed=3))
    outputs = run_all(z_engine)
    assert set(outputs) == {"running", "good"}
    assert all(o.error is None and o.images.std() > 0.01 for o in outputs.values())
    assert z_engine.memory_stats()["states"] == 0


def test_caller_may_reuse_its_tensor(z_engine):
    """The engine keeps a copy: overwriting the given tensor after add_request changes nothing."""
    reference = images(z_engine, {"ref": (TEXTS[0], dict(seed=4))})["ref"]
    embeds = encode(z_engine, TEXTS[0]).clone()
    z_engine.add_request("reused", {"prompt_embeds": embeds}, Params(**SMALL, seed=4))
    z_engine.step()
    embeds.fill_(0.0)
    assert np.array_equal(run_all(z_engine)["reused"].images, reference)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_z_image_matches_diffusers_on_the_same_embeds(z_engine, guidance):
    """ZImagePipeline(prompt_embeds=[...], negative_prompt_embeds=[...]) vs our engine on the same tensors."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_path("z_image"))
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = hf_hidden_states(TEXTS[1]), encode(z_engine, "dull")
    reference = pipe(
        prompt_embeds=[embeds], negative_prompt_embeds=[negative] if guidance else None,
        guidance_scale=guidance, height=32, width=32, num_inference_steps=3,
        generator=torch.Generator().manual_seed(5), output_type="np",
    ).images  # fmt: skip
    prompt = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    ours = images(z_engine, {"ours": (prompt, dict(seed=5, guidance_scale=guidance))})["ours"]
    assert max_diff(ours, reference) < 1e-4 and reference.std() > 0.01  # measured 0.0


def test_sd3_embeds_and_pooled_make_the_text_image(sd3_engine):
    """SD3 takes ``prompt_embeds`` with ``pooled_prompt_embeds`` (diffusers' argument names). The tensors the
    stage itself made of the text give its image bitwise; ``encode`` of the text alone differs in float noise
    (CLIP/T5 round differently in a batch of 2 texts); StableDiffusion3Pipeline on the same tensors agrees."""
    from diffusers import StableDiffusion3Pipeline

    params, runner = dict(seed=3, guidance_scale=5.0), sd3_engine.runner
    text = images(sd3_engine, {"text": ({"prompt": TEXTS[0], "negative_prompt": "dull"}, params)})["text"]
    with torch.inference_mode():
        used = runner._conditioning([TEXTS[0]])[TEXTS[0]]  # what the text request was conditioned on
    out = {}
    for key, (embeds, pooled) in {"used": used, "alone": encode(sd3_engine, TEXTS[0])}.items():
        prompt = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt": "dull"}
        out[key] = images(sd3_engine, {key: (prompt, params)})[key]
    assert np.array_equal(out["used"], text)
    assert max_diff(out["alone"], text) < 1e-4
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_path("sd3"))
    pipe.set_progress_bar_config(disable=True)
    embeds, pooled = used
    reference = pipe(
        prompt_embeds=embeds[None], pooled_prompt_embeds=pooled[None], negative_prompt="dull",
        guidance_scale=5.0, height=32, width=32, num_inference_steps=3,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).images  # fmt: skip
    assert max_diff(out["used"], reference) < 1e-3


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"prompt_embeds": "seq"}, r"sd3 takes \['prompt_embeds', 'pooled_prompt_embeds'\] together; "
                                   r"\['pooled_prompt_embeds'\] missing"),
        ({"prompt_embeds": _z((77, 128)), "pooled_prompt_embeds": "pooled"},
         r"prompt_embeds must have shape \(333, 128\) for sd3, got \(77, 128\)"),
        ({"prompt_embeds": "seq", "pooled_prompt_embeds": _z((64,))},
         r"pooled_prompt_embeds must have shape \(96,\) for sd3, got \(64,\)"),
        ({"prompt_embeds": "seq", "pooled_prompt_embeds": "pooled", "negative_prompt_embeds": "seq"},
         r"\['negative_pooled_prompt_embeds'\] missing"),
    ],
)  # fmt: skip
def test_sd3_refusals(sd3_engine, given, message):
    embeds, pooled = encode(sd3_engine, "x")
    prompt = {key: {"seq": embeds, "pooled": pooled}.get(v, v) if isinstance(v, str) else v
              for key, v in given.items()}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        sd3_engine.add_request("bad", prompt, Params(**SMALL, guidance_scale=5.0))
    assert not sd3_engine.has_unfinished_requests()


@pytest.mark.parametrize("family", ["z_image", "sd3"])
def test_diffusers_executor_passes_embeds_to_the_pipeline(family, z_engine, sd3_engine):
    """use_diffusers: the tensors go to the pipeline's own prompt_embeds arguments (negatives encoded by the
    stage's encoder when not given, as natively), image-to-image too; images equal the native engine's; the
    checks are the same."""
    native = {"z_image": z_engine, "sd3": sd3_engine}[family]
    executor = create_diffusion_engine(tiny_model_path(family), DiTConfig(use_diffusers=True))
    given = encode(native, TEXTS[2])
    keys = native.runner.family.embeds_keys
    cond = dict(zip(keys, given if isinstance(given, tuple) else (given,), strict=True))
    negative = {f"negative_{k}": v for k, v in cond.items()}
    requests = {
        "plain": (cond, dict(seed=1, guidance_scale=0.0)),
        "guided": (cond, dict(seed=2, guidance_scale=5.0)),
        "guided2": ({**cond, "negative_prompt": "dull"}, dict(seed=3, guidance_scale=5.0)),
        "given_negative": ({**cond, **negative}, dict(seed=4, guidance_scale=5.0)),
        "image_to_image": ({**cond, "image": init_image()}, dict(seed=5, guidance_scale=5.0, strength=0.7)),
    }
    ours, theirs = images(executor, requests), images(native, requests)
    for request_id in requests:
        assert max_diff(ours[request_id], theirs[request_id]) < 1e-3, request_id
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape"):
        executor.add_request("bad", {**cond, "prompt_embeds": torch.zeros(3)}, Params(**SMALL))
    assert not executor.has_unfinished_requests()
