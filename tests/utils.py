"""Helpers shared by the tests: real engines and servers, images, the HF LLaVA reference."""

import gc
import os
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vllm_omni.testing.server import wait_healthy

IMAGE_PROMPT = "<|im_start|>user\n<image>Describe the image.<|im_end|>\n<|im_start|>assistant\n"


def random_image(seed: int, width: int = 32, height: int = 32) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_request(*images: Image.Image, text: str = "Describe the images.") -> dict:
    prompt = f"<|im_start|>user\n{'<image>' * len(images)}{text}<|im_end|>\n<|im_start|>assistant\n"
    return {"prompt": prompt, "multi_modal_data": {"image": list(images)}}


class HFReference:
    """HF transformers' ``get_image_features`` on the same tiny LLaVA folder, float32."""

    def __init__(self, path: str):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    def __call__(self, *images: Image.Image) -> torch.Tensor:
        """Rows for ``images``, concatenated in order: (16 * len(images), hidden)."""
        pixel_values = self.processor.image_processor(list(images), return_tensors="pt").pixel_values
        with torch.no_grad():
            features = self.model.get_image_features(pixel_values=pixel_values)
        features = getattr(features, "pooler_output", features)
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])


@contextmanager
def running_llm(model: str, **kwargs):
    """A real ``vllm.LLM`` on CPU, shut down (EngineCore and workers) on exit."""
    from vllm import LLM

    kwargs = {"max_model_len": 512, "max_num_seqs": 8, "enforce_eager": True, **kwargs}
    llm = LLM(model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def num_preemptions(outputs) -> int:
    """How often vLLM preempted the requests of ``outputs`` (their engine's stats must be on:
    ``disable_log_stats=False``). Counted per request, not from the process's Prometheus registry: each
    engine started with stats on takes the registry over, so a later one hides an earlier one's counters."""
    return sum(output.metrics.num_preemptions for output in outputs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: str | None, *args: str, timeout: float = 240):
    """``vllm serve [model] *args`` on a free local port (CPU, eager, 512-token context); yields its URL.

    The server's output goes to a temporary file (a pipe nobody reads would fill up and stall it); its
    tail is in the error when the server exits or does not become healthy within ``timeout`` seconds.
    """
    port = free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    cmd = [str(vllm_cli), "serve", *([model] if model else []), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "512", "--enforce-eager", *args]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_healthy(url, process, timeout, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
