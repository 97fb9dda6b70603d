"""Stage launchers: where a stage's process runs. Local processes are the default.

A launcher starts a stage from its :class:`~vllm_omni.pipeline.stage_process.StageBootstrap` parts and
returns a :class:`StageHandle`, through which the manager sends the stage its messages, watches it and
stops it; the stage's messages arrive in the manager's queue as ``(tag, bytes)`` (``None`` when the
stage is gone), tagged as the manager asked (a replica's slot). The launcher also chooses how messages
travel (its ``codec``: local processes pass large tensors in /dev/shm). ``RayLauncher``
(``vllm_omni.pipeline.ray_launcher``, ``launcher="ray"``) runs each replica as a Ray actor.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import subprocess
import sys
import threading
from typing import IO, Any, Protocol

import psutil

from vllm_omni.config.stage import PIPELINE_LAUNCHERS, OmniStageConfig, parse_cpu_list
from vllm_omni.pipeline.channel import Channel, channel_pair
from vllm_omni.pipeline.kinds import get_stage_kind
from vllm_omni.pipeline.stage_io import MessageCodec, SharedMemoryCodec
from vllm_omni.pipeline.stage_process import StageBootstrap

CHILD_GRACE_SECONDS = 5.0
"""How long a stopped stage's own children get to exit before they are killed."""
LOG_TAIL_LINES = 20
"""Lines of a stage's output kept for the error that reports its end."""
EXIT_WAIT_SECONDS = 2.0
"""How long a stage that closed its connection gets to report its exit code."""
STAGE_COMMAND = "from vllm_omni.pipeline.stage_process import main; main()"


class StageHandle(Protocol):
    """A running stage, as the manager sees it."""

    def send(self, data: Any) -> None:
        """Queue a message (made by the launcher's codec) for the stage."""
        ...

    def is_alive(self) -> bool: ...

    def exit_description(self) -> str:
        """How the stage ended (for errors that name it): exit code and its last lines of output."""
        ...

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a clean exit, then kill the stage and what it started."""
        ...


class StageLauncher(Protocol):
    """Starts stages."""

    def codec(self, threshold: int) -> MessageCodec:
        """A new pipeline's codec: tensors of at least ``threshold`` bytes travel out of the messages."""
        ...

    def launch(
        self, config: OmniStageConfig, tag: int, received: queue.Queue, codec: MessageCodec
    ) -> StageHandle:
        """Start ``config``'s stage (one replica); its messages go to ``received`` as ``(tag, data)``."""
        ...


def make_launcher(launcher: StageLauncher | str | None) -> StageLauncher:
    """The launcher an option names: ``None`` or ``"local"`` (local processes), ``"ray"`` (Ray actors on
    the cluster ``ray.init()`` finds), or a launcher object as it is."""
    if launcher is None or launcher == "local":
        return LocalProcessLauncher()
    if launcher == "ray":
        from vllm_omni.pipeline.ray_launcher import RayLauncher

        return RayLauncher()
    if isinstance(launcher, str):
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {list(PIPELINE_LAUNCHERS)}")
    return launcher


class LocalProcessLauncher:
    """One local process per stage replica (the default launcher): a fresh interpreter, safe with CUDA."""

    def codec(self, threshold: int) -> SharedMemoryCodec:
        return SharedMemoryCodec(threshold)

    def launch(
        self, config: OmniStageConfig, tag: int, received: queue.Queue, codec: MessageCodec
    ) -> LocalProcess:
        ours, theirs = channel_pair()
        bootstrap = StageBootstrap(config, get_stage_kind(config.engine_type), theirs.fileno(), codec)
        process = subprocess.Popen(
            [sys.executable, "-c", STAGE_COMMAND],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(theirs.fileno(),),
            env={**os.environ, **stage_environment(config)},
            start_new_session=True,  # its own process group: the launcher stops the stage and all it
            # started; a terminal's Ctrl-C reaches only the manager, which shuts the stages down
        )
        theirs.close()
        handle = LocalProcess(process, Channel(ours, received, tag=tag))
        try:
            pickle.dump(sys.path, process.stdin)
            pickle.dump(bootstrap, process.stdin)
            process.stdin.close()
        except BrokenPipeError:  # it died at once; its exit code and output tell why
            pass
        return handle


class LocalProcess:
    """A stage in a local process; its stdout and stderr pass through to ours, the last lines kept."""

    def __init__(self, process: subprocess.Popen, channel: Channel) -> None:
        self.process, self.channel = process, channel
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._copiers = [
            threading.Thread(target=self._copy, args=(stream, fd), daemon=True, name="omni-stage-log")
            for stream, fd in ((process.stdout, 1), (process.stderr, 2))
        ]
        for copier in self._copiers:
            copier.start()

    def send(self, data: bytes) -> None:
        self.channel.send(data)

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def exit_description(self) -> str:
        try:  # a stage whose channel just closed is exiting
            code = self.process.wait(EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            return "closed its connection while running"
        for copier in self._copiers:  # the last lines may still be on their way
            copier.join(timeout=1.0)
        tail = "".join(self.tail).rstrip()
        return f"exited with code {code}" + (f"; its last output:\n{tail}" if tail else "")

    def stop(self, timeout: float) -> None:
        """Join, else kill; then whatever is left of the stage's process group (its EngineCore and
        workers), even when the stage itself died before."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _, alive = psutil.wait_procs(_group_members(self.process.pid), timeout=CHILD_GRACE_SECONDS)
        for child in alive:
            child.kill()
        self.channel.close()

    def _copy(self, stream: IO[bytes], fd: int) -> None:
        for line in iter(stream.readline, b""):
            self.tail.append(line.decode(errors="replace"))
            try:
                os.write(fd, line)
            except OSError:  # our own output is closed: keep only the tail
                pass
        stream.close()


OPENMP_WAITING = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
"""How a stage's OpenMP threads wait between parallel regions, unless either variable is set: they spin
briefly (libgomp: 1000 turns, a few microseconds), then sleep. Intel's OpenMP sleeps at once (passive).

A pipeline's processes share the machine's cores: stages, the manager (and a server), their clients.
OpenMP's default spin (libgomp: 300000 turns) took the cores the others needed, and when one of a stage's
threads was descheduled its peers spun for their whole time slice. On 2 cores, with the server and the
load generator beside the stage: the tiny SD3 behind ``vllm serve --omni`` 1.1 vs 17.5 images/s, the
tiny Qwen3 (16 in flight) 360 vs 4270 tokens/s (the stage spent 45 instead of 3.4 CPU-seconds on the
same 512 requests). Sleeping at once instead costs the tiny Qwen3 a third of its single-request speed
(1.7 vs 1.2 ms per token: each of its many tiny parallel regions wakes the threads); the short spin
keeps both.
"""


def stage_environment(config: OmniStageConfig, devices: bool = True) -> dict[str, str]:
    """What a stage's process adds to the environment: how its OpenMP threads wait (unless set here), its
    CPU placement and, with ``devices``, its devices (Ray assigns an actor's GPUs itself)."""
    environment = {} if OPENMP_WAITING.keys() & os.environ.keys() else dict(OPENMP_WAITING)
    if devices and config.devices is not None:
        environment["CUDA_VISIBLE_DEVICES"] = config.devices
    if config.cpus is not None:
        environment["VLLM_CPU_OMP_THREADS_BIND"] = config.cpus
        environment["OMP_NUM_THREADS"] = str(len(parse_cpu_list(config.cpus)))
    return environment


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid`` (a stage leads its own group)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return members
