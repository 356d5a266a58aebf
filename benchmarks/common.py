"""What the benchmark scripts share: where the data is, the machine line, the median summary,
fresh-process runs with their peak memory, and the Keras peer's own virtual environment."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The zips of ../shared/data; IMGCLS_BENCH_DATA points elsewhere (a GPU machine's copy of them, say).
SHARED = Path(os.environ.get("IMGCLS_BENCH_DATA") or ROOT.parent / "shared" / "data")
RESULTS = ROOT / "benchmarks" / "results"
KERAS_VENV = Path(os.environ.get("IMGCLS_KERAS_VENV", Path.home() / ".cache" / "imgcls-bench" / "keras-venv"))
# The peer's packages: the CPU build of TensorFlow from the package index, in its own venv.
KERAS_PACKAGES = ["tensorflow-cpu==2.21.0", "pillow", "numpy"]


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> dict:
    """CPU model, cores, torch version and device of this machine."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "device": device,
            "python": platform.python_version()}


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}, python {m['python']}"


def spread(values: list[float], fmt: str = ".1f") -> str:
    """'median [min, max]' of ``values``."""
    if not values:
        return "n/a"
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def run_child(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run ``cmd`` in a fresh process; return wall seconds, peak RSS (MiB) and exit code.

    The peak RSS is the child's own (``wait4``), not this process's.
    """
    start = time.time()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), "BENCH_T0": repr(start)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        raise
    wall = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def keras_python(given: str | None = None) -> str:
    """The Python of the Keras peer's venv, creating it (pip install tensorflow-cpu) on first use."""
    if given:
        return given
    python = KERAS_VENV / "bin" / "python"
    marker = KERAS_VENV / ".installed"
    if not marker.is_file() or marker.read_text() != " ".join(KERAS_PACKAGES):
        print(f"installing the Keras peer into {KERAS_VENV} ({', '.join(KERAS_PACKAGES)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(KERAS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *KERAS_PACKAGES], check=True)
        marker.write_text(" ".join(KERAS_PACKAGES))
    return str(python)


def save_results(name: str, doc: dict) -> Path:
    """Write ``doc`` (plus the machine) to benchmarks/results/<name>.json atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **doc}, indent=1))
    os.replace(tmp, path)
    return path
