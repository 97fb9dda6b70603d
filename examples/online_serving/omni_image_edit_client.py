"""Edit an image (image-to-image, or inpainting with a mask) on an omni server with the openai client.

Start a server first, e.g. on the tiny random SD3 (no download):
    python -m vllm_omni.testing.tiny_models --out tiny sd3
    vllm serve tiny/sd3 --omni --dit-steps 4 --dit-size 64x64
then:
    python examples/online_serving/omni_image_edit_client.py --url http://localhost:8000 \
        --image photo.png --size 64x64 --out edited.png [--stream --partial-images 2] [--mask mask.png]
Without --image, a generated 64x64 gradient is the image to edit. With --stream, the server sends
previews while the image denoises (image_edit.partial_image events), written as edited.partial<i>.png.
With --mask (a PNG of the image's size, as OpenAI takes it) only its fully transparent pixels are edited.
"""

import argparse
import base64
import io
from pathlib import Path

import openai
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    parser.add_argument("--image", help="the image to edit (png, jpeg, webp, ...)")
    parser.add_argument("--mask", help="inpainting: a PNG whose fully transparent pixels mark where to edit")
    parser.add_argument("--prompt", default="the same scene at sunset")
    parser.add_argument("--strength", type=float, default=0.6, help="how much to change it, in (0, 1]")
    parser.add_argument("--size", default="auto", help="WIDTHxHEIGHT, or auto: the image's own size")
    parser.add_argument("--out", default="edited.png", help="where to write the edited PNG")
    parser.add_argument("--stream", action="store_true", help="stream the edit: previews, then the image")
    parser.add_argument("--partial-images", type=int, default=1, help="previews to stream (0-3)")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    image = Path(args.image) if args.image else ("gradient.png", _gradient(), "image/png")
    request = {"image": image, "prompt": args.prompt, "size": args.size,
               "extra_body": {"strength": args.strength, "seed": 7}}  # fmt: skip
    if args.mask:
        request["mask"] = Path(args.mask)
    if args.stream:
        edited, size = _streamed_edit(client, request, args)
    else:
        response = client.images.edit(**request)
        edited, size = response.data[0].b64_json, response.size
    Path(args.out).write_bytes(base64.b64decode(edited))
    print(f"{args.out} ({size})")


def _streamed_edit(client: openai.OpenAI, request: dict, args: argparse.Namespace) -> tuple[str, str]:
    """The edited image (base64) and its size; each preview is written next to --out on the way."""
    for event in client.images.edit(**request, stream=True, partial_images=args.partial_images):
        if event.type == "image_edit.completed":
            return event.b64_json, event.size
        preview = Path(args.out).with_suffix(f".partial{event.partial_image_index}.png")
        preview.write_bytes(base64.b64decode(event.b64_json))
        print(f"{preview} (preview {event.partial_image_index})")
    raise SystemExit("the stream ended without the edited image")


def _gradient(size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size))
    image.putdata([(4 * x, 4 * y, 128) for y in range(size) for x in range(size)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
