"""`vllm serve MODEL --omni` on the tiny SD3 (a DiT-only pipeline): the official openai client, the native
endpoints, bad input, the API key, the command line, SIGTERM."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import psutil
import pytest
import requests
from PIL import Image

from tests.utils import free_port, running_server
from vllm_omni.config.dit import DiTConfig
from vllm_omni.diffusion.request import DiffusionSamplingParams
from vllm_omni.entrypoints.cli.main import main as omni_cli_main
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.v1.engine.diffusion_engine import DiffusionEngine

DIT_FLAGS = ("--omni", "--dit-steps", "2", "--dit-size", "32x32")
VLLM = str(Path(sys.executable).parent / "vllm")


@pytest.fixture(scope="module")
def url():
    with running_server(tiny_model_path("sd3"), *DIT_FLAGS, "--max-queued-requests", "64") as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_images_generate_equals_the_dit_engine_with_the_same_seed(client):
    response = client.images.generate(prompt="a red sunset", n=2, size="32x32", extra_body={"seed": 5})
    assert len(response.data) == 2 and response.data[0].revised_prompt is None
    engine = DiffusionEngine(tiny_model_path("sd3"), DiTConfig(num_inference_steps=2, height=32, width=32))
    for i in range(2):
        engine.add_request(str(i), "a red sunset", DiffusionSamplingParams(seed=5 + i))
    expected = {}
    while engine.has_unfinished_requests():
        expected.update({o.request_id: o for o in engine.step()})
    for i, item in enumerate(response.data):
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (32, 32)
        diff = np.abs(np.asarray(image, dtype=int) - np.asarray(expected[str(i)].images[0], dtype=int))
        assert diff.max() <= 1  # the same image (uint8, another batch layout)


def test_streamed_previews_then_the_completed_image(client):
    seed = {"seed": 2}
    stream = client.images.generate(prompt="a red sunset", stream=True, partial_images=1, extra_body=seed)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[0].partial_image_index == 0 and decode(events[0].b64_json).size == (32, 32)
    whole = client.images.generate(prompt="a red sunset", extra_body=seed).data[0].b64_json
    assert events[1].b64_json == whole  # previews leave the image alone
    assert events[0].b64_json != whole


def test_output_formats_and_quality(client):
    jpeg = client.images.generate(prompt="a cat", output_format="jpeg", output_compression=50, quality="low")
    assert decode(jpeg.data[0].b64_json).format == "JPEG" and jpeg.output_format == "jpeg"
    webp = client.images.generate(prompt="a cat", output_format="webp")
    assert decode(webp.data[0].b64_json).format == "WEBP"


def test_the_images_client_example(url, tmp_path):
    example = Path(__file__).parents[2] / "examples" / "online_serving" / "omni_images_client.py"
    result = subprocess.run([sys.executable, str(example), "--url", url, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"omni_images_client_{i}.png" for i in (0, 1)]


def test_the_serve_demo_serves_answers_and_stops_cleanly(tmp_path):
    example = Path(__file__).parents[2] / "examples" / "online_serving" / "omni_serve_demo.py"
    command = [sys.executable, str(example), "--out", str(tmp_path), "--port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "server stopped with exit code 0" in result.stdout and len(list(tmp_path.glob("*.png"))) == 2


BAD_REQUESTS = [
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"n": 1}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "size": "30x32"}, "size"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "size": "256x256"}, "size"),  # more than the tiny SD3's position embedding covers
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "background": "transparent"}, "background"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x", "output_compression": 50}, "output_compression"),
    ({"prompt": "x", "output_format": "jpeg", "output_compression": 101}, "output_compression"),
    ({"prompt": "x", "quality": "ultra"}, "quality"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "style": "vivid"}, "style"),
    ({"prompt": "x", "stream": True, "n": 2}, "n"),
    ({"prompt": "x", "partial_images": 1}, "partial_images"),
    ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images"),
]


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
def test_bad_image_requests_are_400_naming_the_field_and_the_server_goes_on(url, body, param):
    response = requests.post(f"{url}/v1/images/generations", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["code"] == 400
    good = requests.post(f"{url}/v1/images/generations", json={"prompt": "fine"}, timeout=60)
    assert good.status_code == 200


def test_malformed_json_is_400(url):
    response = requests.post(f"{url}/v1/images/generations", data="{not json", timeout=60,
                             headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400 and "error" in response.json()


def test_health_info_models_and_generate(url):
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    info = requests.get(f"{url}/info", timeout=10).json()
    (stage,) = info["stages"]
    assert (stage["kind"], stage["executor"], stage["limits"]["size_factor"]) == ("dit", "native", 4)
    assert requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == tiny_model_path("sd3")
    body = {"prompt": "a dog", "params": {"0": {"seed": 1, "num_inference_steps": 1}}}
    out = requests.post(f"{url}/generate", json=body, timeout=60).json()
    assert out["text"] is None and decode(out["images"][0]).size == (32, 32)
    assert out["stages"]["0"] == {
        "kind": "dit",
        "seed": 1,
        "num_steps": 1,
        "seconds": out["stages"]["0"]["seconds"],
    }
    bad = requests.post(f"{url}/generate", json={"prompt": "a dog", "params": {"3": {}}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "params"
    bad = requests.post(
        f"{url}/generate", json={"prompt": "a dog", "params": {"0": {"height": 30}}}, timeout=60
    )
    assert (
        bad.status_code == 400
        and "stage 0 (dit): height must be a multiple of 4" in bad.json()["error"]["message"]
    )


def sse_events(response: requests.Response) -> list[tuple[str, dict]]:
    """``(event, data)`` of a server-sent event stream."""
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_generate_streams_previews_the_stage_and_latents(url):
    params = {"seed": 3, "num_inference_steps": 2, "partial_images": 1, "return_latents": True}
    body = {"prompt": "a dog", "params": {"0": params}, "stream": True}
    response = requests.post(f"{url}/generate", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [name for name, _ in events] == ["partial_image", "stage", "done"]
    assert events[0][1]["index"] == 0 and decode(events[0][1]["image"]).size == (32, 32)
    assert events[1][1]["kind"] == "dit" and events[1][1]["num_steps"] == 2
    done = events[2][1]
    whole = requests.post(f"{url}/generate", json={**body, "stream": False}, timeout=60).json()
    assert done["images"] == whole["images"] and done["stages"]["0"]["seed"] == 3
    latents = np.load(io.BytesIO(base64.b64decode(done["latents"]["data"])))
    assert list(latents.shape) == done["latents"]["shape"] and latents.shape[-2:] == (16, 16)  # tiny VAE: /2
    refused = requests.post(f"{url}/generate", json={**body, "params": {"0": {"height": 30}}}, timeout=60)
    assert refused.status_code == 400  # refused before the stream starts: a plain HTTP error


def test_a_client_that_goes_away_aborts_its_request_in_the_stage(url):
    slow = {"prompt": "slow", "params": {"0": {"num_inference_steps": 20_000}}}
    slow_stream = {"prompt": "slow", "num_inference_steps": 1000, "stream": True, "partial_images": 1}
    for path, body in (("/generate", slow), ("/generate", slow), ("/v1/images/generations", slow_stream)):
        with socket.create_connection(_address(url)) as client:  # sends, waits until it runs, hangs up
            request = json.dumps(body).encode()
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            client.sendall(f"{head}Content-Length: {len(request)}\r\n\r\n".encode() + request)
            _wait_for(url, lambda stats: stats["running"] == 1)
        stats = _wait_for(url, lambda stats: stats["running"] == 0)
        assert (stats["waiting"], stats["states"], stats["running_bytes"]) == (0, 0, 0)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _wait_for(url: str, condition, timeout: float = 60) -> dict:
    """The DiT stage's stats once ``condition`` holds (polled)."""
    deadline = time.monotonic() + timeout
    while not condition(stats := requests.get(f"{url}/info", timeout=10).json()["stages"][0]["stats"]):
        assert time.monotonic() < deadline, stats
    return stats


def test_the_api_key_guards_everything_but_health():
    with running_server(tiny_model_path("sd3"), *DIT_FLAGS, "--api-key", "sesame") as url:
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").images.generate(prompt="x")
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="sesame").images.generate(prompt="x").data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--omni"], "no pipeline: give MODEL"),
        (["--omni", "--ar-stage", "x"], "--ar-stage and --dit-stage go together"),
        (["MODEL", "--omni", "--dit-size", "12"], "--dit-size: must look like 1024x768"),
        (["MODEL", "--omni", "--dit-steps", "0"], "--dit-steps: must be >= 1"),
        (["MODEL", "--omni", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_command_line_errors_name_the_flag(args, message):
    result = subprocess.run([VLLM, "serve", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_help_all_lists_every_flag_with_vllms_engine_flags(capsys):
    with pytest.raises(SystemExit):
        omni_cli_main(["serve", "--omni", "--help=all"])
    shown = capsys.readouterr().out
    for flag in ("--dit-steps", "--api-key", "--chat-template", "--max-model-len", "--dtype",
                 "--enable-return-mm-embedding", "--return-prompt-hidden-states", "--uvicorn-log-level",
                 "--disable-uvicorn-access-log"):  # fmt: skip
        assert f"  {flag}" in shown, flag


def test_a_model_that_cannot_load_fails_start_up_naming_the_stage(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    result = subprocess.run(
        [VLLM, "serve", str(tmp_path), "--omni"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "stage 0 (dit) failed to start" in result.stderr, result.stderr[-2000:]


def test_sigterm_stops_the_server_and_every_stage():
    process = subprocess.Popen([VLLM, "serve", tiny_model_path("sd3"), *DIT_FLAGS, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for line in process.stdout:
        if "Uvicorn running" in line or "Application startup complete" in line:
            break
    tree = psutil.Process(process.pid).children(recursive=True)
    assert tree  # the stage process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert alive == []


@pytest.mark.engine
def test_ar_to_dit_rewrites_the_prompt_with_the_system_prompt(qwen3_llm):
    from vllm import SamplingParams

    from vllm_omni.pipeline.stage_input import chat_prompt

    system = "Rewrite the prompt for an image model."
    args = ("--omni", "--ar-stage", tiny_model_path("qwen3"), "--dit-stage", tiny_model_path("sd3"),
            "--ar-system-prompt", system, *DIT_FLAGS[1:], "--dtype", "float32")  # fmt: skip
    with running_server(None, *args) as url:
        response = openai.OpenAI(base_url=f"{url}/v1", api_key="x").images.generate(prompt="a red sunset")
        assert isinstance(response.data[0].revised_prompt, str)
        greedy = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
        body = {"prompt": "a red sunset", "params": {"0": greedy, "1": {"seed": 1}}}
        out = requests.post(f"{url}/generate", json=body, timeout=120).json()
    turns = [{"role": "system", "content": system}, {"role": "user", "content": "a red sunset"}]
    expected = qwen3_llm.generate(
        chat_prompt(tiny_model_path("qwen3"), None, turns), SamplingParams(**greedy)
    )
    assert out["text"] == expected[0].outputs[0].text == out["stages"]["0"]["text"]
    assert out["stages"]["0"]["num_generated_tokens"] == 8 and len(out["images"]) == 1


def test_a_killed_replica_fails_its_requests_and_the_last_one_kills_the_pipeline(tmp_path):
    config = tmp_path / "replicas.yaml"
    config.write_text(
        f"stages:\n- {{stage_id: 0, engine_type: dit, model_path: {tiny_model_path('sd3')}, replicas: 2,\n"
        "   dit_config: {num_inference_steps: 2, height: 32, width: 32}}\n"
    )
    with running_server(str(config), "--omni", "--disable-uvicorn-access-log") as url:
        first, second = sorted(_stage_processes(url), key=lambda p: p.pid)  # started in replica order
        slow = {"prompt": "slow", "params": {"0": {"num_inference_steps": 20_000}}}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(requests.post, f"{url}/generate", json=slow, timeout=60)
            _wait_until(lambda: first.cpu_percent(0.2) > 50)  # replica 0 (the least busy) took it
            first.kill()
            killed = time.monotonic()
            response = pending.result()
        assert time.monotonic() - killed < 5
        assert response.status_code == 500
        assert "stage 0 (dit) replica 0 exited with code -9" in response.json()["error"]["message"]
        health = requests.get(f"{url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "stage 0 (dit) replica 0" in health.json()["dead_replicas"][0]
        fast = requests.post(f"{url}/v1/images/generations", json={"prompt": "a cat"}, timeout=60)
        assert fast.status_code == 200 and len(fast.json()["data"]) == 1  # replica 1 serves on
        second.kill()  # no replica left: the pipeline is dead, 503 naming the stage
        _wait_until(lambda: requests.get(f"{url}/health", timeout=10).status_code == 503)
        dead = requests.post(f"{url}/v1/images/generations", json={"prompt": "a cat"}, timeout=60)
        assert dead.status_code == 503 and "stage 0 (dit) replica 1" in dead.json()["error"]["message"]


def _wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _stage_processes(url: str) -> list[psutil.Process]:
    """The stage processes of the server listening at ``url`` (found by its --port)."""
    port = url.rsplit(":", 1)[1]
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "serve" in cmdline and port in cmdline:
            return [p for p in process.children() if "stage_process" in " ".join(p.cmdline())]
    raise AssertionError(f"no server on port {port}")
