"""Return the multimodal encoder's embeddings with plain ``vllm.LLM``.

Runs on the tiny random LLaVA by default (no download); on a GPU pass a real model:

    .venv/bin/python examples/offline_inference/mm_embedding_example.py
    python examples/offline_inference/mm_embedding_example.py --model llava-hf/llava-1.5-7b-hf
"""

import argparse
import os

import numpy as np
from PIL import Image
from vllm import LLM, SamplingParams

from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on GPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the tiny random LLaVA")
    args = parser.parse_args()
    if args.model is None:
        from vllm_omni.testing.tiny_models import tiny_model_path

        args.model = tiny_model_path("llava")

    llm = LLM(args.model, max_model_len=1024, enable_return_mm_embedding=True)
    rng = np.random.RandomState(0)
    cat, dog = (Image.fromarray(rng.randint(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(2))
    messages = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": cat}, {"type": "image_pil", "image_pil": dog},
        {"type": "text", "text": "Compare the two images."},
    ]}]  # fmt: skip

    completion = llm.chat(messages, SamplingParams(max_tokens=16))[0].outputs[0]
    print(completion)  # shows mm_embedding's shape and dtype, not its values
    for item in completion.mm_embedding_items:
        rows = completion.mm_embedding[item.offset : item.offset + item.length]
        print(f"item {item.index} ({item.modality}): {tuple(rows.shape)}, mean {rows.float().mean():+.4f}")

    # Per request: one float16 row per image (mean pooling).
    pooled = SamplingParams(max_tokens=16, extra_args=MMEmbeddingParams(dtype="float16", pooling="mean")
                            .to_extra_args())  # fmt: skip
    completion = llm.chat(messages, pooled)[0].outputs[0]
    print("pooled:", tuple(completion.mm_embedding.shape), completion.mm_embedding.dtype)


if __name__ == "__main__":
    main()
