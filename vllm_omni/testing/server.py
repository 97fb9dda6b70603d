"""Waiting for a server started in a subprocess (``vllm serve ...``) to become healthy: ``wait_healthy``."""

from __future__ import annotations

import http.client
import subprocess
import time
import urllib.request
from typing import IO

POLL_SECONDS = 0.5
LOG_TAIL_CHARS = 3000


class ServerStartError(RuntimeError):
    """A server that exited, or was not healthy in time, before ``/health`` answered 200."""


def wait_healthy(
    url: str, process: subprocess.Popen, timeout: float = 300, log: IO[str] | None = None
) -> None:
    """Return once ``GET {url}/health`` answers 200.

    Raise ``ServerStartError`` as soon as ``process`` (the server) exits, or after ``timeout`` seconds;
    the message names the command and ends with the tail of ``log``, the text file the server writes its
    output to (when it writes to a terminal instead, leave ``log`` out: the reader has the output).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _is_healthy(url):
            return
        time.sleep(POLL_SECONDS)
    code = process.poll()
    state = f"exited with {code}" if code is not None else f"was not healthy in {timeout:g} s"
    args = process.args
    command = args if isinstance(args, str) else " ".join(map(str, args))
    message = f"the server ({command}) {state}"
    if log is not None:
        log.seek(0)
        message += f"; its log ends:\n{log.read()[-LOG_TAIL_CHARS:]}"
    raise ServerStartError(message)


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # not listening yet, a 503 (HTTPError), a reset
        return False
