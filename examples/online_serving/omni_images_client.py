"""Ask an omni server for images with the official openai client.

Start a server first, e.g. on the tiny random SD3 (no download):
    python -m vllm_omni.testing.tiny_models --out tiny sd3
    vllm serve tiny/sd3 --omni --dit-steps 4 --dit-size 64x64
then:
    python examples/online_serving/omni_images_client.py --url http://localhost:8000 --out outputs
"""

import argparse
import base64
from pathlib import Path

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    parser.add_argument("--prompt", default="a red sunset over the sea")
    parser.add_argument("--out", default="outputs", help="folder for the PNGs")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    response = client.images.generate(prompt=args.prompt, n=2, extra_body={"seed": 7})
    Path(args.out).mkdir(exist_ok=True)
    for i, image in enumerate(response.data):
        path = Path(args.out) / f"omni_images_client_{i}.png"
        path.write_bytes(base64.b64decode(image.b64_json))
        print(f"{path} ({response.size}); revised prompt: {image.revised_prompt!r}")


if __name__ == "__main__":
    main()
