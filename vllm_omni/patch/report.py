"""What the patch layer did in a process, and how to ask vLLM's EngineCore and workers for it.

>>> from vllm_omni.patch.report import engine_report
>>> engine_report(llm)   # {"frontend": {...}, "engine_core": {...}, "workers": [{...}, ...]}
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import asdict
from typing import Any

from vllm_omni.patch.registry import state


def process_report() -> dict[str, Any]:
    """The patch layer's state in this process, with the process's pid and name."""
    return {"pid": os.getpid(), "process": multiprocessing.current_process().name, **asdict(state())}


def engine_report(llm) -> dict[str, Any]:
    """Ask a ``vllm.LLM``'s own process, its EngineCore process and every worker for their report."""
    engine = llm.llm_engine
    return {
        "frontend": process_report(),
        "engine_core": engine.engine_core.call_utility("omni_patch_report"),
        "workers": engine.collective_rpc("omni_patch_report"),
    }


def add_engine_core_utility(module) -> None:
    """Give ``EngineCore`` an ``omni_patch_report`` utility method (clients call it by name).

    Beside the layer's state it counts the requests whose mm_embedding items the scheduler holds.
    """

    def omni_patch_report(self) -> dict[str, Any]:
        collector = getattr(self.scheduler, "_omni_mm_collector", None)
        return {**process_report(), "mm_embedding_requests": len(collector.requests) if collector else 0}

    module.EngineCore.omni_patch_report = omni_patch_report


def add_worker_method(module) -> None:
    """Give ``WorkerBase`` an ``omni_patch_report`` method (reached through ``collective_rpc``).

    Beside the layer's state it counts the requests the worker's mm_embedding capturer tracks
    (``None`` while the feature is off: no capturer exists).
    """

    def omni_patch_report(self) -> dict[str, Any]:
        capturer = getattr(getattr(self, "model_runner", None), "_omni_mm_capturer", None)
        return {**process_report(), "mm_embedding_requests": capturer.num_tracked() if capturer else None}

    module.WorkerBase.omni_patch_report = omni_patch_report
