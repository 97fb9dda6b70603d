"""Helpers shared by the tests: real engines, images, the HF LLaVA reference."""

import gc
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

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
