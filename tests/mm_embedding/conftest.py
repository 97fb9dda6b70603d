"""Fixtures for mm_embedding tests: engines with the feature on, HF reference embeddings, images."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import running_llm

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


@pytest.fixture(scope="session")
def hf_reference(llava_path) -> HFReference:
    return HFReference(llava_path)


@pytest.fixture(scope="session")
def llava_mm_llm(llava_path):
    """Tiny LLaVA, float32, feature on, prefix caching on (vLLM's default)."""
    with running_llm(llava_path, dtype="float32", enable_return_mm_embedding=True) as llm:
        yield llm
