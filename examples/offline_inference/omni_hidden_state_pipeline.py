"""Hidden-state hand-off: an LLM stage (vLLM) encodes the prompt, a Z-Image DiT stage draws from it.

Z-Image's text encoder is a Qwen3 LM: the DiT conditions on the LM's second-to-last hidden layer over the
chat-templated prompt. Here that encoding runs in a vLLM AR stage (batched and scheduled by vLLM) and
the DiT stage receives it as ``prompt_embeds``. Runs on the tiny random checkpoints by default (the tiny
Z-Image's encoder is the tiny Qwen3), writes one PNG per prompt, and checks that the image equals the
one the DiT stage draws from the text with its own encoder. With real models:

    python examples/offline_inference/omni_hidden_state_pipeline.py --z-image Tongyi-MAI/Z-Image-Turbo \\
        --steps 8 --size 1024   # --llm defaults to the Z-Image folder's text_encoder/ + tokenizer/
"""

import argparse
import os
from pathlib import Path

import numpy as np

from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on GPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z-image", default=None, help="Z-Image diffusers folder (default: tiny random)")
    parser.add_argument("--llm", default=None, help="LM folder of the text encoder (default: tiny Qwen3)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="outputs", help="folder for the PNGs")
    args = parser.parse_args()
    if args.z_image is None:
        from vllm_omni.testing.tiny_models import tiny_model_path

        args.z_image, args.llm = tiny_model_path("z_image"), args.llm or tiny_model_path("qwen3")
    dit_options = dict(num_inference_steps=args.steps, height=args.size, width=args.size)
    # final_output=True: the prompt hidden states come back with each result too (printed below)
    encoder = create_ar_stage_config(0, args.llm, ["text"], ["hidden_states"], final_output=True,
                                     stage_input="chat_template", prompt_hidden_states_layer=-2,
                                     dtype="float32", max_model_len=1024)  # fmt: skip
    dit = create_dit_stage_config(1, args.z_image, ["hidden_states"], ["image"], **dit_options)
    prompts = ["A beautiful landscape", "A red sunset over the sea"]
    params = [{"max_tokens": 1}, [{"seed": i} for i in range(len(prompts))]]  # the AR stage only encodes
    omni = OmniLLM([encoder, dit])
    outputs = omni.generate(prompts, params)
    omni.close()
    in_process = OmniLLM([create_dit_stage_config(0, args.z_image, **dit_options)])
    references = in_process.generate(prompts, [{"seed": i} for i in range(len(prompts))])
    in_process.close()
    Path(args.out).mkdir(exist_ok=True)
    for i, (out, ref) in enumerate(zip(outputs, references, strict=True)):
        path = Path(args.out) / f"omni_hidden_state_{i}.png"
        out.images[0].save(path)
        embeds = out.stage_outputs[0].outputs[0].prompt_hidden_states
        diff = np.abs(np.asarray(out.images[0], dtype=int) - np.asarray(ref.images[0], dtype=int)).max()
        print(f"{out.prompt!r}: stage 0 encoded {tuple(embeds.shape)}, stage 1 drew {path}; "
              f"max pixel difference vs the DiT's own encoder: {diff}")  # fmt: skip


if __name__ == "__main__":
    main()
