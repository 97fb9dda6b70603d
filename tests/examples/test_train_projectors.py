"""examples/training/train_projectors.py end to end: train, then greedy accuracy through vLLM."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "examples" / "training" / "train_projectors.py"


def load_script():
    """The example as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("train_projectors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.mark.engine
def test_trained_projectors_answer_through_vllm(tmp_path):
    small = ["--classes", "4", "--steps", "100", "--lr", "1e-2", "--num-eval", "32", "--out", str(tmp_path)]
    accuracies = load_script().main(small)
    assert accuracies["vllm_after"] >= 0.9, accuracies
    assert accuracies["vllm_after"] > accuracies["vllm_before"], accuracies
    assert accuracies["hf_after"] >= 0.9, accuracies
    # Same folder, same weights, float32: vLLM and transformers pick the same token for every item.
    assert accuracies["agreement"] == 1.0, accuracies
