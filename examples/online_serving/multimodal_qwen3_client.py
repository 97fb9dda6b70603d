"""Chat with a multimodal Qwen3 server, sending raw embeddings as a `multimodal_embeddings` content part.

MODEL=$(python -m vllm_omni.testing.tiny_models --out /tmp/tiny multimodal_qwen3)   # or your own folder
vllm serve $MODEL --port 8000 &
python examples/online_serving/multimodal_qwen3_client.py --url http://127.0.0.1:8000

The part maps each modality name of the checkpoint (its config.json `multimodal_projectors`) to one
base64 item or a list of them. An item is a `numpy.save` (.npy) file of shape (width,) for one position
or (n, width) for n positions; a `torch.save` file of one tensor works too. The part becomes the
modalities' placeholders (`<|audio|>`, ...) right where it sits among the text parts. A bad item is an
HTTP 400 whose message names it, e.g. multimodal_embeddings['audio'][0].
"""

import argparse
import base64
import io

import numpy as np
import requests


def npy_base64(array: np.ndarray) -> str:
    """``array`` as base64 of its .npy file (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def embeddings_part(**items: str | list[str]) -> dict:
    """A content part: modality name -> one base64 item or a list of them."""
    return {"type": "multimodal_embeddings", "multimodal_embeddings": items}


WIDTHS = {"audio": 24, "vision": 16}
"""Modality name -> item width of the tiny checkpoint; for a real one, its encoders' output widths."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server address")
    parser.add_argument("--model", default=None, help="served model name (default: the server's first)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model = args.model or requests.get(f"{args.url}/v1/models").json()["data"][0]["id"]

    rng = np.random.default_rng(0)
    audio = rng.standard_normal((5, WIDTHS["audio"]), dtype=np.float32)  # one item, 5 positions
    vision = [rng.standard_normal(WIDTHS["vision"], dtype=np.float32) for _ in range(2)]  # 2 items, 1 each
    content = [
        {"type": "text", "text": "Listen: "},
        embeddings_part(audio=npy_base64(audio)),
        {"type": "text", "text": " and look: "},
        embeddings_part(vision=[npy_base64(v) for v in vision]),
        {"type": "text", "text": " What is it?"},
    ]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens}
    response = requests.post(f"{args.url}/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise SystemExit(f"HTTP {response.status_code}: {response.json()['error']['message']}")
    reply = response.json()
    print("reply:", repr(reply["choices"][0]["message"]["content"]))
    print("usage:", reply["usage"])


if __name__ == "__main__":
    main()
