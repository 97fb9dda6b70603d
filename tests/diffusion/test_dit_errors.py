"""Bad input, aborts and failures: clear errors, other requests keep being served, nothing is held."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.diffusion.conftest import run_all
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.request import DiffusionSamplingParams as Params
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine

SMALL = dict(height=32, width=32, num_inference_steps=3, seed=0)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("x", dict(height=33, width=32), "height must be a multiple of"),
        ("x", dict(height=32, width=4096), r"width 4096 exceeds the stage's maximum \(DiTConfig.max_width"),
        ("x", dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
        ("x", dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
        ("x", dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
        ("x", dict(strength=0.5), r"strength is for image-to-image: pass the init image as prompt\['image"),
        ({"prompt": "x", "image": "img.png"}, dict(), "image must be a PIL image"),
        ("x", dict(sampler="DDIMScheduler"), "sampler 'DDIMScheduler' is not supported by"),
        ("x", dict(output_type="jpeg"), "output_type must be one of"),
        ({"text": "x"}, dict(), r"unknown DiT prompt key\(s\) \['text'\]"),
        (3, dict(), "a DiT prompt must be a str or a dict"),
    ],
)
def test_bad_input_is_refused_and_engine_keeps_serving(dit_engine, prompt, params, message):
    dit_engine.add_request("good", "a red sunset", Params(**SMALL))
    with pytest.raises(ValueError, match=message):
        dit_engine.add_request("bad", prompt, Params(**{**SMALL, **params}))
    outputs = run_all(dit_engine)
    assert set(outputs) == {"good"} and outputs["good"].error is None


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_strength_outside_range(strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        Params(strength=strength)


def test_abort_at_any_step_frees_the_request(dit_engine):
    baseline = dit_engine.memory_stats()
    assert baseline["running"] == baseline["states"] == baseline["running_bytes"] == 0
    for i in range(3):
        params = Params(**{**SMALL, "num_inference_steps": 6, "seed": i})
        dit_engine.add_request(f"a{i}", "a red sunset", params)
    dit_engine.step()
    dit_engine.step()
    assert dit_engine.memory_stats()["running_bytes"] > 0
    dit_engine.abort_request("a1")
    assert "a1" not in dit_engine.runner.states  # latents released at once, not at the next step
    outputs = run_all(dit_engine)
    assert outputs["a1"].error == "aborted" and outputs["a0"].error is None and outputs["a2"].error is None
    after = dit_engine.memory_stats()
    assert after["running"] == after["waiting"] == after["states"] == after["running_bytes"] == 0


def test_abort_waiting_request(dit_path):
    engine = DiffusionEngine(dit_path, DiTConfig(max_batch_size=1))
    engine.add_request("first", "x", Params(**SMALL))
    engine.add_request("queued", "y", Params(**SMALL))
    engine.step()
    assert engine.memory_stats()["waiting"] == 1
    engine.abort_request("queued")
    outputs = run_all(engine)
    assert outputs["queued"].error == "aborted" and outputs["first"].error is None
    assert engine.memory_stats()["states"] == 0


def test_bounded_queue_and_batch(dit_path):
    """The stage holds at most max_batch_size + max_waiting_requests requests (what a pipeline manager may
    keep in flight to it), whether or not a step admitted them into the running batch yet."""
    engine = DiffusionEngine(dit_path, DiTConfig(max_batch_size=2, max_waiting_requests=3))
    assert engine.limits.max_num_requests == 5
    for i in range(5):
        engine.add_request(f"q{i}", "x", Params(**SMALL))
    full = r"the waiting queue is full: the stage holds 5 requests \(DiTConfig.max_batch_size 2 \+ "
    with pytest.raises(ValueError, match=full):
        engine.add_request("q5", "x", Params(**SMALL))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("q0", "x", Params(**SMALL))
    engine.step()
    assert (engine.memory_stats()["running"], engine.memory_stats()["waiting"]) == (2, 3)
    with pytest.raises(ValueError, match=full):
        engine.add_request("q5", "x", Params(**SMALL))
    assert len(run_all(engine)) == 5


def _count_frees(runner, monkeypatch) -> Counter:
    """Spy on the runner's one free path (the real one runs): how often each request id was freed."""
    freed, free = Counter(), runner._free

    def counted(request_ids):
        freed.update(request_ids)
        free(request_ids)

    monkeypatch.setattr(runner, "_free", counted)
    return freed


def test_each_ended_request_is_freed_once(dit_path, monkeypatch):
    """Finished, failed and aborted (running or waiting) requests reach the runner once, in a scheduler
    output's finished_req_ids: an abort frees at once; the engine stays unfinished until all are freed."""
    engine = DiffusionEngine(dit_path, DiTConfig(max_batch_size=3))
    runner, freed = engine.runner, _count_frees(engine.runner, monkeypatch)
    _fail_setup_of("broken", runner.family, monkeypatch)
    engine.add_request("done", "x", Params(**{**SMALL, "num_inference_steps": 1}))
    engine.add_request("broken", "x", Params(**SMALL))
    engine.add_request("running", "y", Params(**SMALL))
    engine.add_request("waiting", "z", Params(**SMALL))
    outputs = {o.request_id: o.error for o in engine.step()}
    assert outputs == {"done": None, "broken": "RuntimeError: cannot encode init image"}
    assert set(runner.states) == {"done", "running"} and not freed  # "done" is freed by the next output
    engine.abort_request(["running", "waiting"])
    assert not runner.states and set(freed) == {"done", "broken", "running", "waiting"}
    assert engine.has_unfinished_requests()  # the aborts are still to be reported
    assert {o.request_id: o.error for o in engine.step()} == {"running": "aborted", "waiting": "aborted"}
    engine.add_request("last", "x", Params(**{**SMALL, "num_inference_steps": 1}))
    assert [o.request_id for o in engine.step()] == ["last"] and engine.has_unfinished_requests()
    assert run_all(engine) == {} and not runner.states
    assert set(freed.values()) == {1} and len(freed) == 5


def test_a_failed_step_frees_its_group_once(dit_engine, monkeypatch):
    """A group whose forward raises fails alone; its states are freed by the next scheduler output."""
    freed, family = _count_frees(dit_engine.runner, monkeypatch), dit_engine.runner.family
    dit_engine.add_request("f0", "x", Params(**SMALL))
    dit_engine.add_request("f1", "y", Params(**SMALL))

    def predict(states):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(family, "predict", predict)
    errors = {o.request_id: o.error for o in dit_engine.step()}
    assert errors == dict.fromkeys(["f0", "f1"], "RuntimeError: forward failed")
    assert dit_engine.memory_stats()["states"] == 2 and dit_engine.has_unfinished_requests()
    assert dit_engine.step() == [] and not dit_engine.has_unfinished_requests()
    assert dit_engine.memory_stats()["states"] == 0 and freed == {"f0": 1, "f1": 1}


def _fail_setup_of(request_id: str, family, monkeypatch) -> None:
    """Make the set-up of ``request_id`` raise, as an init image the VAE cannot take would."""
    original = family.prepare

    def prepare(request, cond, uncond):
        if request.request_id == request_id:
            raise RuntimeError("cannot encode init image")
        return original(request, cond, uncond)

    monkeypatch.setattr(family, "prepare", prepare)


def test_failing_request_does_not_stop_the_others(dit_engine, monkeypatch):
    """A request whose set-up raises (e.g. an init image the VAE cannot take) fails alone."""
    _fail_setup_of("broken", dit_engine.runner.family, monkeypatch)
    dit_engine.add_request("broken", "x", Params(**SMALL))
    dit_engine.add_request("fine", "y", Params(**SMALL))
    outputs = run_all(dit_engine)
    assert outputs["broken"].error == "RuntimeError: cannot encode init image"
    assert outputs["fine"].error is None and dit_engine.memory_stats()["states"] == 0


def test_config_errors_name_the_field(dit_path):
    with pytest.raises(ValueError, match=r"DiTConfig.dtype must be one of"):
        DiTConfig(dtype="int8")
    with pytest.raises(ValueError, match=r"DiTCacheConfig.conditioning_cache_policy must be one of"):
        DiTConfig(cache={"conditioning_cache_policy": "mru"})
    with pytest.raises(ValueError, match=r"DiTConfig: unknown key\(s\) \['steps'\]"):
        DiTConfig.from_dict({"steps": 3})
    with pytest.raises(ValueError, match="DiTConfig.scheduler 'DDIMScheduler' is not supported"):
        DiffusionEngine(dit_path, DiTConfig(scheduler="DDIMScheduler"))
