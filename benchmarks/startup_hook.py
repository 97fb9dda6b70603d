"""Start-up cost of the patch layer's ``.pth`` hook, measured side by side in one run.

Every Python process of the environment imports ``vllm_omni.patch.startup``. This prints:
- the hook's own import time (``python -X importtime``: cumulative time of ``vllm_omni.patch.startup``),
- wall time of ``python -c pass`` with the hook vs ``python -S -c pass`` plus the site-packages path but
  without processing .pth files (so neither run pays for the hook), and their difference.

Run: ``.venv/bin/python benchmarks/startup_hook.py [--quick] [--runs N]`` (``--quick``: 3 runs)
"""

import argparse
import statistics
import subprocess
import sys
import sysconfig
import time

import harness

HOOK = "vllm_omni.patch.startup"


def hook_import_us() -> int:
    """Cumulative import time (microseconds) of the start-up hook in one fresh interpreter."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    for line in err.stderr.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 3 and fields[2].strip() == HOOK:
            return int(fields[1])
    raise RuntimeError(f"{HOOK} was not imported at start-up: is vllm-omni installed in this environment?")


def wall_ms(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    runs = harness.parse_args(parser, runs=3).runs
    purelib = sysconfig.get_paths()["purelib"]
    without_pth = ["-S", "-c", f"import sys; sys.path.append({purelib!r})"]
    with_hook, without_hook, imports = [], [], []
    for _ in range(runs):  # interleaved, so drift in machine load hits both sides alike
        with_hook.append(wall_ms(["-c", "pass"]))
        without_hook.append(wall_ms(without_pth))
        imports.append(hook_import_us() / 1000)
    w, wo, imp = (statistics.median(x) for x in (with_hook, without_hook, imports))
    print(f"runs: {runs} (medians)")
    print(f"hook import time (-X importtime, cumulative): {imp:.2f} ms")
    print(f"python -c pass, all .pth files incl. hook:    {w:.2f} ms")
    print(f"python -S (no .pth files processed):          {wo:.2f} ms")
    print(f"difference (all .pth files, not only ours):   {w - wo:.2f} ms  (ratio {w / wo:.2f}x)")
    harness.config(f"{runs} fresh interpreters each way, interleaved, medians")
    harness.headline("hook import time, ms", imp, "< 20 ms")
    harness.headline("python -c pass, all .pth files / none", w / wo)


if __name__ == "__main__":
    main()
