"""Two-stage omni pipeline: an LLM writes the image prompt (AR stage), a diffusion transformer draws it.

Runs on the tiny random checkpoints by default (tiny Qwen3 -> tiny SD3; no download) and writes one PNG
per prompt. Random weights make random text and noise images: the point is the path. With real models:

    python examples/offline_inference/omni_text_to_image.py --llm Qwen/Qwen3-0.6B \\
        --dit stabilityai/stable-diffusion-3-medium-diffusers --steps 28 --size 1024
"""

import argparse
import os
from pathlib import Path

from vllm import SamplingParams

from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config
from vllm_omni.diffusion.request import DiffusionSamplingParams

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on GPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default=None, help="AR stage model (default: the tiny random Qwen3)")
    parser.add_argument("--dit", default=None, help="DiT stage model (default: the tiny random SD3)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="outputs", help="folder for the PNGs")
    args = parser.parse_args()
    if args.llm is None or args.dit is None:
        from vllm_omni.testing.tiny_models import tiny_model_path

        args.llm, args.dit = args.llm or tiny_model_path("qwen3"), args.dit or tiny_model_path("sd3")

    ar = create_ar_stage_config(stage_id=0, model_path=args.llm, input_modalities=["text"],
                                output_modalities=["text"], max_model_len=512)  # fmt: skip
    dit = create_dit_stage_config(stage_id=1, model_path=args.dit, input_modalities=["text"],
                                  output_modalities=["image"], num_inference_steps=args.steps,
                                  height=args.size, width=args.size)  # fmt: skip
    omni = OmniLLM([ar, dit])
    prompts = [{"prompt": "Describe a beautiful landscape:"}, {"prompt": "Describe a red sunset:"}]
    # One entry per stage; the DiT entry has one params object per prompt.
    dit_params = [DiffusionSamplingParams(seed=i) for i in range(len(prompts))]
    params = [SamplingParams(temperature=0.8, max_tokens=24), dit_params]
    outputs = omni.generate(prompts, params)
    Path(args.out).mkdir(exist_ok=True)
    for i, out in enumerate(outputs):
        path = Path(args.out) / f"omni_text_to_image_{i}.png"
        out.images[0].save(path)
        print(f"{out.prompt['prompt']!r}\n  stage 0 wrote the prompt: {out.text!r}\n  stage 1 drew {path}")
    omni.close()


if __name__ == "__main__":
    main()
