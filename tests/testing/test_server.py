"""``wait_healthy``: returns once ``/health`` answers 200; a server that exits fails at once, with its log's
tail; one that never gets healthy fails at the timeout. Tiny stand-in servers (the standard library's)."""

import subprocess
import sys
import tempfile
import time

import pytest

from tests.utils import free_port
from vllm_omni.testing.server import ServerStartError, wait_healthy

STAND_IN = """
import http.server, sys, time
time.sleep(1)  # not listening at first
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(int(sys.argv[2]) if self.path == "/health" else 404)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def stand_in(status: int) -> tuple[str, subprocess.Popen]:
    """A server whose ``/health`` answers ``status`` after a second; its URL and process."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", STAND_IN, str(port), str(status)],
                               stderr=subprocess.DEVNULL)  # fmt: skip
    return f"http://127.0.0.1:{port}", process


def test_returns_once_health_answers_200():
    url, process = stand_in(200)
    try:
        wait_healthy(url, process, timeout=30)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_a_server_never_healthy_fails_at_the_timeout():
    url, process = stand_in(503)
    try:
        with pytest.raises(ServerStartError, match="was not healthy in 3 s"):
            wait_healthy(url, process, timeout=3)
    finally:
        process.kill()
        process.wait()


def test_a_server_that_exits_fails_at_once_naming_the_command_with_its_log_tail():
    script = "print('stage 0 (dit): no such model'); raise SystemExit(3)"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=log, text=True)
        start = time.monotonic()
        with pytest.raises(ServerStartError) as failed:
            wait_healthy("http://127.0.0.1:9", process, timeout=60, log=log)
    assert time.monotonic() - start < 10
    message = str(failed.value)
    assert "exited with 3" in message and "raise SystemExit(3)" in message  # the command
    assert message.endswith("its log ends:\nstage 0 (dit): no such model\n")
