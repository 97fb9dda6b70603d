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

    Beside the layer's state it counts the requests whose mm_embedding items, prompt hidden states or
    per-layer hidden-state rows the scheduler holds (``None`` while a feature is off: vLLM's own
    scheduler runs).
    """

    def omni_patch_report(self) -> dict[str, Any]:
        from vllm_omni.v1.core.sched.hidden_states import HiddenStatesCollector
        from vllm_omni.v1.core.sched.mm_embedding import MMEmbeddingCollector
        from vllm_omni.v1.core.sched.output_collectors import collector
        from vllm_omni.v1.core.sched.prompt_hidden_states import PromptHiddenStatesCollector

        def held(collector_cls) -> int | None:
            active = collector(self.scheduler, collector_cls)
            return None if active is None else len(active.requests)

        return {
            **process_report(),
            "mm_embedding_requests": held(MMEmbeddingCollector),
            "prompt_hidden_states_requests": held(PromptHiddenStatesCollector),
            "hidden_states_requests": held(HiddenStatesCollector),
        }

    module.EngineCore.omni_patch_report = omni_patch_report


def add_worker_method(module) -> None:
    """Give ``WorkerBase`` an ``omni_patch_report`` method (reached through ``collective_rpc``).

    Beside the layer's state it counts the requests the worker's mm_embedding and prompt hidden-state
    capturers track (``None`` while a feature is off: no capturer exists) and the input-extras tensors
    its runner holds (``None`` for models without extras).
    """

    def omni_patch_report(self) -> dict[str, Any]:
        from vllm_omni.v1.worker.input_extras import num_input_extras
        from vllm_omni.v1.worker.mm_embedding_capture import MMEmbeddingCapturer
        from vllm_omni.v1.worker.prompt_hidden_states_capture import PromptHiddenStatesCapturer
        from vllm_omni.v1.worker.request_captures import capture_of

        runner = getattr(self, "model_runner", None)

        def tracked(capture_cls) -> int | None:
            capture = None if runner is None else capture_of(runner, capture_cls)
            return None if capture is None else capture.num_tracked()

        return {
            **process_report(),
            "mm_embedding_requests": tracked(MMEmbeddingCapturer),
            "prompt_hidden_states_requests": tracked(PromptHiddenStatesCapturer),
            "input_extras_requests": None if runner is None else num_input_extras(runner),
        }

    module.WorkerBase.omni_patch_report = omni_patch_report
