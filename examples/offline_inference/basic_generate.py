"""Offline generation through plain ``vllm.LLM`` with the vllm-omni patch layer armed.

Builds the tiny random-weight checkpoints (no hub access needed), generates with tiny Qwen3 (text) and
tiny LLaVA (text + image, returning the image's encoder embeddings with
``enable_return_mm_embedding=True``), and shows that the patch layer is active in the user's process,
vLLM's EngineCore process and its worker processes. Random weights produce random text: the point is
the path.

    .venv/bin/python examples/offline_inference/basic_generate.py
"""

import os

import numpy as np
from PIL import Image
from vllm import LLM, SamplingParams

from vllm_omni.patch.report import engine_report
from vllm_omni.testing.tiny_models import tiny_model_path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models need little KV cache


def show_patch_layer(llm: LLM) -> None:
    report = engine_report(llm)
    for process in [report["frontend"], report["engine_core"], *report["workers"]]:
        print(
            f"  patch layer in {process['process']} (pid {process['pid']}): "
            f"armed by {'+'.join(process['armed_by'])}, applied {len(process['applied'])} patches"
        )


def main() -> None:
    params = SamplingParams(temperature=0.0, max_tokens=16)

    qwen3 = LLM(tiny_model_path("qwen3"), max_model_len=512, enforce_eager=True)
    show_patch_layer(qwen3)
    # Prompts of 7+ tokens: stock vllm-cpu 0.32 in bfloat16 dies on 2-token prompts on AMX CPUs.
    prompts = ["Hello, world! Tell me a story.", "A beautiful landscape, painted in oils"]
    for output in qwen3.generate(prompts, params):
        print(f"[qwen3] {output.prompt!r} -> {output.outputs[0].text!r}")
    qwen3.llm_engine.engine_core.shutdown()

    llava = LLM(
        tiny_model_path("llava"), max_model_len=512, enforce_eager=True, enable_return_mm_embedding=True
    )
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": image}, {"type": "text", "text": "Describe the image."},
    ]}]  # fmt: skip
    completion = llava.chat(messages, params)[0].outputs[0]
    print(f"[llava] image + 'Describe the image.' -> {completion.text!r}")
    embedding = completion.mm_embedding
    print(f"[llava] mm_embedding: {tuple(embedding.shape)} {embedding.dtype} on {embedding.device}, "
          f"items {completion.mm_embedding_items}")  # fmt: skip
    llava.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
