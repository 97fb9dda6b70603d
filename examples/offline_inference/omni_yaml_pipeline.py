"""Load an omni pipeline from a YAML stage-config file and run it (tiny checkpoints by default).

python examples/offline_inference/omni_yaml_pipeline.py [--config PATH] [--out outputs]
"""

import argparse
import os
from pathlib import Path

from vllm_omni import OmniLLM

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on GPU
DEFAULT_CONFIG = Path(__file__).with_name("omni_pipeline.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out", default="outputs", help="folder for the PNGs")
    args = parser.parse_args()
    if "OMNI_LLM" not in os.environ or "OMNI_DIT" not in os.environ:
        from vllm_omni.testing.tiny_models import tiny_model_path

        os.environ.setdefault("OMNI_LLM", tiny_model_path("qwen3"))
        os.environ.setdefault("OMNI_DIT", tiny_model_path("sd3"))
    omni = OmniLLM(args.config)
    outputs = omni.generate(["Describe a mountain lake:"], [{"max_tokens": 24}, {"seed": 0}])
    omni.close()
    Path(args.out).mkdir(exist_ok=True)
    for i, out in enumerate(outputs):
        path = Path(args.out) / f"omni_yaml_{i}.png"
        out.images[0].save(path)
        print(f"stage 0 wrote {out.text!r}; stage 1 drew {path}")


if __name__ == "__main__":
    main()
