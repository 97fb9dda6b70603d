"""Ask a `vllm serve ... --enable-return-mm-embedding` server for the image embeddings; decode with numpy.

MODEL=$(python -m vllm_omni.testing.tiny_models --out /tmp/tiny llava)   # or a real model on GPU
vllm serve $MODEL --enable-return-mm-embedding --port 8000 &
python examples/online_serving/mm_embedding_client.py --url http://127.0.0.1:8000
"""

import argparse
import base64
import io

import numpy as np
import requests
from PIL import Image


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode_mm_embedding(field: dict) -> np.ndarray:
    """The choice's ``mm_embedding`` as a numpy array (bfloat16 arrives as its uint16 bit patterns)."""
    array = np.load(io.BytesIO(base64.b64decode(field["data"])), allow_pickle=False)
    assert list(array.shape) == field["shape"]
    return array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    model = requests.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],  # fmt: skip
        "max_tokens": 16,
        "return_mm_embedding": True,
        "mm_embedding_dtype": "float32",
    }
    choice = requests.post(f"{args.url}/v1/chat/completions", json=body).json()["choices"][0]
    field = choice["mm_embedding"]
    embedding = decode_mm_embedding(field)
    print("text:", repr(choice["message"]["content"]))
    print("embedding:", embedding.shape, embedding.dtype, "items:", field["items"])


if __name__ == "__main__":
    main()
