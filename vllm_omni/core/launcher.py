"""Stage launchers: where a stage's process runs. Local processes are the default.

A launcher starts ``run_stage(config, inbox, outbox, prefix, threshold)`` somewhere and returns a handle
the manager can watch and stop. Another launcher (e.g. Ray actors on other machines) implements the same
two methods; docs/features/omni_pipelines.md describes how that maps.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import psutil

from vllm_omni.config.stage import OmniStageConfig, parse_cpu_list
from vllm_omni.core.stage_worker import run_stage

CHILD_GRACE_SECONDS = 5.0
"""How long a stopped stage's own children get to exit before they are killed."""


class StageHandle(Protocol):
    """A running stage, as the manager sees it."""

    def is_alive(self) -> bool: ...

    def exit_description(self) -> str:
        """How the stage ended (for errors that name it), e.g. ``exit code -9``."""
        ...

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a clean exit, then kill the stage and what it started."""
        ...


class StageLauncher(Protocol):
    """Starts stages; ``mp_context`` (a multiprocessing context) makes the queues the manager and the
    stages talk through."""

    mp_context: Any

    def launch(self, config: OmniStageConfig, inbox: Any, outbox: Any, prefix: str, threshold: int) -> Any:
        """Start ``config``'s stage; returns its :class:`StageHandle`."""
        ...


class LocalProcess:
    """A stage in a local process (spawned: a fresh interpreter, safe with CUDA)."""

    def __init__(self, process: multiprocessing.Process) -> None:
        self.process = process

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def exit_description(self) -> str:
        code = self.process.exitcode
        return "is running" if code is None else f"exited with code {code}"

    def stop(self, timeout: float) -> None:
        """Join, else kill; then whatever is left of the stage's process group (its EngineCore and
        workers), even when the stage itself died before."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        _, alive = psutil.wait_procs(_group_members(self.process.pid), timeout=CHILD_GRACE_SECONDS)
        for child in alive:
            child.kill()
        self.process.close()


class LocalProcessLauncher:
    """One local process per stage (the default launcher)."""

    mp_context = multiprocessing.get_context("spawn")

    def launch(
        self, config: OmniStageConfig, inbox: Any, outbox: Any, prefix: str, threshold: int
    ) -> LocalProcess:
        process = self.mp_context.Process(
            target=run_stage,
            args=(config, inbox, outbox, prefix, threshold),
            name=f"omni-stage-{config.stage_id}-{config.engine_type}",
        )
        with _stage_environment(config):
            process.start()
        return LocalProcess(process)


@contextmanager
def _stage_environment(config: OmniStageConfig) -> Iterator[None]:
    """The parent's environment plus the stage's placement, while its process is spawned (the child
    inherits it before any of its imports; the parent's is restored right after)."""
    overrides = {}
    if config.devices is not None:
        overrides["CUDA_VISIBLE_DEVICES"] = config.devices
    if config.cpus is not None:
        overrides["VLLM_CPU_OMP_THREADS_BIND"] = config.cpus
        overrides["OMP_NUM_THREADS"] = str(len(parse_cpu_list(config.cpus)))
    before = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid`` (a stage makes its own group when it starts)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return members
