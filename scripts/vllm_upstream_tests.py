"""Run vLLM 0.32.0's own tests for every module the patch layer touches, with and without the layer.

The layer must not break vLLM: a test that passes with ``VLLM_OMNI_DISABLE_PATCHES=1`` must pass with the
layer on. Many vLLM tests fail on CPU either way (GPU kernels, hub files), so this compares failure sets.
"Layer on" also puts each class of ``EXTENSIONS`` in place of the vLLM class it extends (a pytest
plugin rebinds the name in vLLM's module before the tests import it), so vLLM's own tests of that class
run against the subclass.

    .venv/bin/python scripts/vllm_upstream_tests.py --src /tmp/pip-download-*/vllm_*/

``--src`` is an unpacked vLLM 0.32.0 source distribution (see docs/testing.md). The test files come from
the ``vllm_tests`` of every entry in ``vllm_omni/patch/patches.py`` unless given with ``--tests``.
Tests that build a config for ``facebook/opt-125m`` get it from an offline Hugging Face cache made here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from vllm_omni.patch.patches import EXTENSIONS, PATCHES

OPT_125M_CONFIG = {
    "architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
    "hidden_size": 768, "ffn_dim": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "max_position_embeddings": 2048, "vocab_size": 50272, "word_embed_proj_dim": 768,
    "do_layer_norm_before": True, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
    "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0,
    "init_std": 0.02, "prefix": "</s>", "torch_dtype": "float16", "use_cache": True,
}  # fmt: skip


# A pytest plugin (written to a temporary folder): each extension class replaces its vLLM base by name.
SUBSTITUTE_PLUGIN = """
import importlib
from vllm_omni.patch.patches import EXTENSIONS
for extension in EXTENSIONS:
    for path in extension.classes:
        module_name, _, name = path.partition(":")
        cls = getattr(importlib.import_module(module_name), name)
        base = next(c for c in cls.__mro__[1:] if c.__module__.startswith("vllm."))
        setattr(importlib.import_module(base.__module__), base.__name__, cls)
"""
PLUGIN = "omni_substitute_extensions"


def offline_hf_home(root: Path) -> Path:
    """An HF_HOME whose hub cache holds only facebook/opt-125m's config.json."""
    repo = root / "hub" / "models--facebook--opt-125m"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(OPT_125M_CONFIG))
    return root


def run_root(src: Path, root: Path) -> Path:
    """A folder with a copy of ``src``'s tests and pytest settings, but not its ``vllm/`` package: run
    from ``src`` itself, pytest would put the source tree first on ``sys.path``, and the tests would
    import that uncompiled ``vllm`` instead of the installed one."""
    shutil.copytree(src / "tests", root / "tests")
    shutil.copy(src / "pyproject.toml", root / "pyproject.toml")
    return root


def run(root: Path, tests: list[str], hf_home: Path, disabled: bool, report: Path) -> set[str]:
    """Run ``tests`` from ``root``; return the ids of failed or errored tests."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "--timeout", "300"]
    if disabled:
        env["VLLM_OMNI_DISABLE_PATCHES"] = "1"
    else:
        (report.parent / f"{PLUGIN}.py").write_text(SUBSTITUTE_PLUGIN)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(report.parent), env.get("PYTHONPATH")]))
        cmd += ["-p", PLUGIN]
    subprocess.run([*cmd, f"--junitxml={report}"], cwd=root, env=env, stdout=subprocess.DEVNULL)
    failed = set()
    for case in ET.parse(report).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(f"{case.get('classname')}::{case.get('name')}")
    total = sum(1 for _ in ET.parse(report).iter("testcase"))
    print(f"{'stock (layer off)' if disabled else 'layer on':18s}: {total} tests, {len(failed)} failed")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="unpacked vLLM 0.32.0 source tree")
    parser.add_argument("--tests", nargs="*", help="test paths relative to --src (default: from PATCHES)")
    args = parser.parse_args()
    tests = args.tests or sorted({t for entry in (*PATCHES, *EXTENSIONS) for t in entry.vllm_tests})
    print("vLLM tests:", " ".join(tests))
    with tempfile.TemporaryDirectory() as tmp:
        hf_home = offline_hf_home(Path(tmp) / "hf")
        root = run_root(args.src, Path(tmp) / "run")
        on = run(root, tests, hf_home, disabled=False, report=Path(tmp) / "on.xml")
        off = run(root, tests, hf_home, disabled=True, report=Path(tmp) / "off.xml")
    new = sorted(on - off)
    print(f"new failures with the layer on: {len(new)}")
    for test in new:
        print("  ", test)
    sys.exit(1 if new else 0)


if __name__ == "__main__":
    main()
