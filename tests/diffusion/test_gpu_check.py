"""benchmarks/gpu/dit_gpu_check.py starts without vLLM (the DiT engine imports without it) and, on a machine
without a GPU, says so and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "benchmarks/gpu/dit_gpu_check.py"
WITHOUT_VLLM = (
    "import runpy, sys; sys.modules['vllm'] = None; sys.argv = [sys.argv[1]]; "  # any `import vllm` fails
    "runpy.run_path(sys.argv[0], run_name='__main__'); "
    "print('engine imported:', 'vllm_omni.v1.engine.diffusion_engine' in sys.modules)"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its whole check (minutes)")
def test_gpu_check_says_no_gpu_without_vllm():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_VLLM, str(SCRIPT)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("no GPU: torch ") and "engine imported: True" in done.stdout
