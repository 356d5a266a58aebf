"""What the benchmark scripts share: where the data is, the machine line, the hardware class, the
median summary, fresh-process runs with their peak memory, and the Keras peer's own virtual environment."""

from __future__ import annotations

import functools
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

# --cpu-class: the environment that caps what the child processes may use.  ATen (torch's own kernels) reads
# ATEN_CPU_CAPABILITY once, when torch is imported; oneDNN (torch's and TensorFlow's convolutions and matrix
# products) reads ONEDNN_MAX_CPU_ISA when it first runs.  So both take effect only in a fresh process.
# imgcls's --precision auto reads both caps (inference.cpu_has_fast_bf16), so an "AVX2" run trains in fp32 as on
# a real AVX2-only CPU.  ONNX Runtime (imgcls's frozen-feature pass) has no such cap: it still runs its AVX-512
# kernels, so an emulated AVX2 figure is optimistic for that part (benchmarks/README.md).
CPU_CLASSES = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
# The /proc/cpuinfo flags the hardware line names, lowest to highest.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# Run in a child with the benchmark's environment: what torch reports there, and the ISA oneDNN dispatches to
# (its verbose mode prints it, on stdout, at the first primitive: a channels_last convolution is one).
_PROBE = r"""
import json, torch
x = torch.randn(2, 16, 16, 16).to(memory_format=torch.channels_last)
w = torch.randn(16, 16, 3, 3).to(memory_format=torch.channels_last)
if torch.backends.mkldnn.is_available():  # builds without oneDNN (some ARM and macOS ones) report no ISA
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        torch.nn.functional.conv2d(x, w)
cuda = torch.cuda.is_available()
print("\nPROBE " + json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "cuda": cuda,
                                "cuda_device": torch.cuda.get_device_name(0) if cuda else None}), flush=True)
"""


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> dict:
    """CPU model, cores, torch version, device and hardware class (see hardware_class) of this machine."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "device": device,
            "python": platform.python_version(), "hardware": dict(_inherited_hardware())}


def machine_line() -> str:
    m = machine()
    hw = m["hardware"]
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}, python {m['python']}, "
            f"hardware class {hw['class']} (torch CPU capability {hw.get('torch_capability')}, "
            f"oneDNN {hw.get('onednn_isa')})")


def add_cpu_class_argument(parser) -> None:
    """Add ``--cpu-class avx2|native`` to an argparse parser."""
    parser.add_argument("--cpu-class", choices=list(CPU_CLASSES), default="native",
                        help="native: whatever this CPU has; avx2: cap torch (ATEN_CPU_CAPABILITY) and oneDNN "
                             "(ONEDNN_MAX_CPU_ISA) at AVX2 in every child process, to stand in for an AVX2-only CPU "
                             "(imgcls's precision auto then trains in fp32; default: native)")


def cpu_class_env(cls: str) -> dict:
    """The environment variables that give child processes the CPU class ``cls`` (``avx2`` or ``native``)."""
    if cls not in CPU_CLASSES:
        raise ValueError(f"unknown CPU class {cls!r}; choose one of: {', '.join(CPU_CLASSES)}")
    return dict(CPU_CLASSES[cls])


def _caps_here() -> dict:
    """The CPU caps (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) set in this process's environment."""
    return {k: os.environ[k] for k in CPU_CLASSES["avx2"] if k in os.environ}


def enter_cpu_class(cls: str) -> None:
    """Make this benchmark process, and every child it starts, run as the CPU class ``cls``.

    torch reads ATEN_CPU_CAPABILITY when it is imported, so the process
    re-executes itself with the class's environment when its own differs
    (``native`` drops the caps a shell may have set).
    """
    wanted = cpu_class_env(cls)
    if _caps_here() == wanted:
        return
    env = {k: v for k, v in os.environ.items() if k not in CPU_CLASSES["avx2"]}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**env, **wanted})  # orig_argv keeps -c/-m


def class_tag() -> str:
    """A short name for the hardware class this process runs as, for result file names: avx2, bf16, cuda, ..."""
    cls = machine()["hardware"]["class"]
    if cls.startswith("AVX2 only"):
        return "avx2"
    if cls in ("AMX", "AVX512-BF16"):
        return "bf16"
    return "".join(ch for ch in cls.split(" (")[0].lower() if ch.isalnum()) or "unknown"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first processor in ``cpuinfo`` (default: this machine's /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def classify_hardware(flags: set[str], env: dict, cuda: bool = False) -> str:
    """The class a run lands in: "CUDA", "AMX", "AVX512-BF16", "AVX512 (no BF16)", "AVX2 only" or "below AVX2".

    ``flags``: the CPU's /proc/cpuinfo flags; ``env``: the child processes' environment (only
    ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA are read).  Both capped at AVX2 on a CPU with more is named
    as an emulation, with the CPU's highest flag; only one of them capped is named as such.
    """
    if cuda:
        return "CUDA"
    caps = {"ATEN_CPU_CAPABILITY": env.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2",
            "ONEDNN_MAX_CPU_ISA": env.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2"}
    if "amx_bf16" in flags:
        native = "AMX"
    elif "avx512_bf16" in flags:
        native = "AVX512-BF16"
    elif "avx512f" in flags:
        native = "AVX512 (no BF16)"
    elif "avx2" in flags:
        native = "AVX2 only"
    else:
        return "below AVX2"
    if not any(caps.values()) or native == "AVX2 only":
        return native
    if not all(caps.values()):  # one library capped, the other not: no real machine is like that
        return f"{native} (partly capped: only {next(k for k, on in caps.items() if on)}=AVX2)"
    highest = next(f for f in reversed(CPU_FLAGS) if f in flags)
    return f"AVX2 only (emulated via ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA on a CPU with {highest})"


def probe_torch(env: dict) -> dict:
    """Ask a fresh process, run with ``env``, for torch's CPU capability, oneDNN's ISA and CUDA."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the hardware probe failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    lines = proc.stdout.splitlines()
    doc = json.loads(next(ln for ln in reversed(lines) if ln.startswith("PROBE "))[6:])
    isa = next((ln.split("isa:", 1)[1].strip() for ln in lines if "onednn_verbose" in ln and "isa:" in ln), None)
    return {**doc, "onednn_isa": isa}


def hardware_class(env: dict, cpuinfo: str | None = None, probe: dict | None = None) -> dict:
    """What the child processes run on under ``env``: CPU, flags, torch's capability, oneDNN's ISA, class.

    ``cpuinfo`` (text of /proc/cpuinfo) and ``probe`` (as :func:`probe_torch` returns) default to this
    machine's, measured; pass them to classify another machine.
    """
    flags = cpu_flags(cpuinfo)
    model = cpu_model() if cpuinfo is None else next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "unknown CPU")
    probe = probe_torch(env) if probe is None else probe
    return {"cpu": model, "flags": {f: f in flags for f in CPU_FLAGS},
            "torch_capability": probe["capability"],
            "onednn_max_isa": env.get("ONEDNN_MAX_CPU_ISA") or "unset (all the CPU has)",
            "onednn_isa": probe.get("onednn_isa"), "cuda_device": probe.get("cuda_device"),
            "env": dict(env),
            "class": classify_hardware(flags, env, bool(probe.get("cuda")))}


@functools.cache
def _inherited_hardware() -> dict:
    """The hardware class of the children this process starts with its own environment (probed once)."""
    env = _caps_here()
    try:
        return hardware_class(env)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, StopIteration) as exc:
        return {"class": f"unknown (the probe failed: {str(exc)[:200]})", "env": env}


def hardware_line(hw: dict) -> str:
    """One line for the top of a benchmark's output, from :func:`hardware_class`."""
    flags = " ".join(f if on else f"-{f}" for f, on in hw["flags"].items())
    gpu = f", GPU {hw['cuda_device']}" if hw.get("cuda_device") else ""
    return (f"hardware class: {hw['class']} | {hw['cpu']} ({flags}) | torch CPU capability "
            f"{hw['torch_capability']} | oneDNN max ISA {hw['onednn_max_isa']}, dispatching to "
            f"{hw['onednn_isa'] or 'unknown'}{gpu}")


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


def peer_python(venv: Path, packages, peer: str) -> str:
    """The Python of a peer's own venv at ``venv``, created with ``packages`` installed on first use (again when
    the packages change): a peer is never a dependency of imgcls."""
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if not marker.is_file() or marker.read_text() != " ".join(packages):
        print(f"installing the {peer} peer into {venv} ({', '.join(packages)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
        marker.write_text(" ".join(packages))
    return str(python)


def keras_python(given: str | None = None) -> str:
    """The Python of the Keras peer's venv, creating it (pip install tensorflow-cpu) on first use."""
    return given or peer_python(KERAS_VENV, KERAS_PACKAGES, "Keras")


def save_results(name: str, doc: dict) -> Path:
    """Write ``doc`` (plus the machine) to benchmarks/results/<name>.json atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **doc}, indent=1))
    os.replace(tmp, path)
    return path
