"""Text plus named raw embeddings in, text out: multimodal Qwen3 with plain ``vllm.LLM`` and the pipeline.

Runs on the tiny random multimodal Qwen3 by default (modalities ``audio``, width 24, and ``vision``, width
16; no download). For a real model, build a folder from any Qwen3 folder first:

    python -m vllm_omni.transformers_utils.multimodal_qwen3_builder --base Qwen3-0.6B --out mmq \\
        --modality audio=24 --modality vision=16
    python examples/offline_inference/multimodal_qwen3_example.py --model mmq
"""

import argparse
import os

import torch
from vllm import LLM, SamplingParams

from vllm_omni import MultimodalQwen3Pipeline

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on GPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the tiny random multimodal Qwen3")
    args = parser.parse_args()
    if args.model is None:
        from vllm_omni.testing.tiny_models import tiny_model_path

        args.model = tiny_model_path("multimodal_qwen3")

    audio = [torch.randn(24), torch.randn(3, 24)]  # one position, then three positions
    vision = [torch.randn(2, 16)]
    params = SamplingParams(temperature=0, max_tokens=16)

    # Plain vLLM: placeholders <|audio|> and <|vision|> mark where each item goes, one per item.
    llm = LLM(args.model, max_model_len=512, enforce_eager=True)
    prompt = {
        "prompt": "Listen <|audio|> then <|audio|>, and look <|vision|>. What happened?",
        "multi_modal_data": {"multimodal_embeddings": {"audio": audio, "vision": vision}},
    }
    output = llm.generate(prompt, params)[0]
    print(f"{len(output.prompt_token_ids)} prompt positions: 1 + 3 audio rows, 2 vision rows, the text")
    print("vLLM:", repr(output.outputs[0].text))
    llm.llm_engine.engine_core.shutdown()
    del llm

    # The high-level pipeline; without placeholders the items go before the text.
    pipeline = MultimodalQwen3Pipeline(args.model, device="auto", max_model_len=512, enforce_eager=True)
    embeddings = {"vision": vision}
    inputs = {"text": "Describe this scene.", "multimodal_data": {"multimodal_embeddings": embeddings}}
    print("pipeline:", repr(pipeline.generate(inputs, max_tokens=16, temperature=0)))


if __name__ == "__main__":
    main()
