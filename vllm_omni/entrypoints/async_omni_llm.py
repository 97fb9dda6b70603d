"""``AsyncOmniLLM``: online inference through an omni pipeline (asyncio; many concurrent requests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

from vllm_omni.config.stage import OmniStageConfig
from vllm_omni.entrypoints.omni_params import pipeline_params
from vllm_omni.pipeline.model_pipelines import pipeline_of
from vllm_omni.pipeline.outputs import OmniRequestOutput
from vllm_omni.pipeline.stage_manager import StageManager
from vllm_omni.pipeline.stage_metrics import StageMetrics


class AsyncOmniLLM:
    """Pipeline of stages served for concurrent callers: ``async for out in omni.generate(...)``.

    Each request yields an :class:`OmniRequestOutput` snapshot whenever one of its stages reports: every
    token of a streaming AR stage (``output_kind`` CUMULATIVE, the ``SamplingParams`` default), each
    stage's finished output, and last the finished request (``finished``; ``error`` if it failed or was
    aborted). A background thread routes the stages' messages; stages run in their own processes.
    """

    def __init__(self, stages: Sequence[OmniStageConfig] | str | Path, **manager_options: Any) -> None:
        """Start every stage (blocking; see :class:`OmniLLM` for ``stages`` and ``manager_options``)."""
        self.stages, launcher = pipeline_of(stages)
        self.manager = StageManager(self.stages, **{"launcher": launcher, **manager_options})
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.manager.start_background(self._deliver)

    async def generate(
        self,
        prompt: Any,
        sampling_params: Any = None,
        request_id: str | None = None,
        modalities: list[str] | None = None,
    ) -> AsyncIterator[OmniRequestOutput]:
        """Run one ``prompt`` through the pipeline, yielding its snapshots until it finishes.

        ``sampling_params`` and ``modalities`` as in ``OmniLLM.generate`` for one prompt. Cancelling the
        consumer (e.g. a client disconnect) aborts the request in whichever stage serves it.
        """
        request_id = request_id or uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in the pipeline")
        params = pipeline_params(self.stages, sampling_params, 1, streaming=True, modalities=modalities)[0]
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        # The first stage's input function may be slow (e.g. loading a tokenizer): not on the loop. A thread
        # cannot be cancelled: a consumer cancelled while it adds (or just as it has added, before this
        # coroutine resumes) aborts the request once it is added.
        adding = asyncio.ensure_future(
            asyncio.to_thread(self.manager.add_requests, [(request_id, prompt, params)], False)
        )
        try:
            await asyncio.shield(adding)
        except BaseException:
            del self._streams[request_id]
            adding.add_done_callback(lambda added: self._abort_if_added(added, request_id))
            raise
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            del self._streams[request_id]
            if not finished:
                self.manager.abort([request_id])

    async def abort(self, request_id: str | list[str]) -> None:
        """Stop requests at whatever stage they are; their streams end with ``error == "aborted"``."""
        self.manager.abort([request_id] if isinstance(request_id, str) else list(request_id))

    async def stage_stats(self, stage_id: int, replica: int | None = None) -> dict[str, Any]:
        """What stage ``stage_id``'s engine holds now (requests, bytes): one replica's, or its live
        replicas' together (``StageManager.stage_stats``)."""
        return await asyncio.to_thread(self.manager.stage_stats, stage_id, replica)

    async def stage_metrics(self, stage_id: int, replica: int = 0) -> StageMetrics:
        """A replica's metrics now (batch, queue, step times, failures, caches, vLLM's own)."""
        return await asyncio.to_thread(self.manager.stage_metrics, stage_id, replica)

    def shutdown(self) -> None:
        """Stop every stage's process."""
        self.manager.shutdown()

    def _abort_if_added(self, adding: asyncio.Future, request_id: str) -> None:
        if not adding.cancelled() and adding.exception() is None:
            self.manager.abort([request_id])

    def _deliver(self, updates: list[OmniRequestOutput]) -> None:
        """Hand each update to its caller's stream: one wake-up per event loop for the whole batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, OmniRequestOutput]]] = {}
        for update in updates:
            target = self._streams.get(update.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], update))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that caller's event loop is closed: nobody is listening
                continue


def _put_all(batch: list[tuple[asyncio.Queue, OmniRequestOutput]]) -> None:
    for stream, update in batch:
        stream.put_nowait(update)
