"""One end of the duplex connection between the stage manager and a stage process.

A Unix socket pair, framed by ``multiprocessing.connection``: ``send`` never blocks the caller (a sender
thread writes), and a receiver thread puts every message, as bytes, into a queue the owner reads with
timeouts (one queue may serve several channels: each item is ``(tag, data)``). When the other end is gone
the receiver puts ``(tag, None)``: a stage learns at once that its manager died, the manager that a stage
did.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

_CLOSE = object()


class Channel:
    """Messages (bytes) over one end of a socket pair."""

    def __init__(
        self,
        sock: socket.socket,
        received: queue.Queue,
        tag: Any = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        """``on_closed`` runs in the receiver thread when the other end is gone."""
        self._sock = sock
        self._on_closed = on_closed
        self._conn = Connection(os.dup(sock.fileno()))  # closes its own descriptor
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._send_loop, name="omni-channel-send", daemon=True),
            threading.Thread(target=self._receive_loop, args=(received, tag), name="omni-channel-recv",
                             daemon=True),
        ]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the other end (dropped once the channel is closed)."""
        self._outgoing.put(data)

    def close(self) -> None:
        """Send what is queued, then end both directions (the other end sees the connection close)."""
        self._outgoing.put(_CLOSE)
        self._threads[0].join(timeout=5)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the receiver thread
        except OSError:
            pass
        self._threads[1].join(timeout=5)
        self._conn.close()
        self._sock.close()

    def _send_loop(self) -> None:
        while (data := self._outgoing.get()) is not _CLOSE:
            try:
                self._conn.send_bytes(data)
            except OSError:  # the other end is gone; the receiver reports it
                return

    def _receive_loop(self, received: queue.Queue, tag: Any) -> None:
        while True:
            try:
                data = self._conn.recv_bytes()
            except (EOFError, OSError):
                received.put((tag, None))
                if self._on_closed is not None:
                    self._on_closed()
                return
            received.put((tag, data))


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected sockets: keep one, give the other to the stage process (``pass_fds``)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
