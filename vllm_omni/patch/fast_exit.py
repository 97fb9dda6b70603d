"""A quick interpreter exit for every process that imported vLLM (its config: engines, workers, servers).

While Python finalizes, it runs several full garbage collections as it tears modules down. A process
that imported vLLM holds ~760k tracked objects (torch, transformers, vLLM), so on CPU these scans took
2.4 s per process, and a ``vllm.LLM`` shutdown took 5.4 s: the EngineCore waits for its worker to exit,
then is still scanning when the frontend's 5 s grace runs out and force-kills it. vLLM 0.32 already
freezes the surviving heap when its EngineCore exits on ROCm; this does it in every vLLM process.

At exit, one full collection still finalizes every unreachable object that exists then; freezing what
survives keeps the finalization's later scans from walking it again (the OS reclaims it).
"""

import atexit
from types import ModuleType


def freeze_heap_at_exit(_config: ModuleType) -> None:
    """Registers vLLM's own ``freeze_gc_heap`` (full collection, then ``gc.freeze()``) to run at exit; the
    registry applies a patch once per process."""
    from vllm.utils.gc_utils import freeze_gc_heap

    atexit.register(freeze_gc_heap)
