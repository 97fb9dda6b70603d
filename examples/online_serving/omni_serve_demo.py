"""Serve the tiny random SD3 with `vllm serve MODEL --omni`, ask it for two images with the openai client,
stop it with SIGTERM (what `make demo` runs; no download).

    .venv/bin/python examples/online_serving/omni_serve_demo.py [--out outputs] [--port 8765]
"""

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from vllm_omni.testing.server import wait_healthy
from vllm_omni.testing.tiny_models import tiny_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs", help="folder for the PNGs")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    vllm = str(Path(sys.executable).parent / "vllm")
    command = [vllm, "serve", tiny_model_path("sd3"), "--omni", "--port", str(args.port), "--dit-steps", "4",
               "--dit-size", "64x64"]  # fmt: skip
    print("$", " ".join(command), flush=True)
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(url, server)  # its output is on this terminal: no log to quote
        client = Path(__file__).with_name("omni_images_client.py")
        subprocess.run([sys.executable, str(client), "--url", url, "--out", args.out], check=True)
    finally:
        server.send_signal(signal.SIGTERM)
        print(f"server stopped with exit code {server.wait(timeout=120)}")


if __name__ == "__main__":
    main()
