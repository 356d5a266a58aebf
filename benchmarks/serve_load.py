"""Load test of the web API: requests/s and latency with micro-batching on and off, torch and ONNX.

For each configuration a fresh server process (``imgcls.serving.app.serve``) is
started on 127.0.0.1 at a free port; ``--clients`` concurrent clients then send
a bounded ``--requests`` POST /v1/predict requests, one image each (real test
images of the run's data when they can be read), ``--repeats`` times.  The
figures are the median over repeats with [min, max].  Everything stays on the
loopback interface and the script stops by itself.  Clients and server share
the machine's cores, so the figures are for this machine only.

    python benchmarks/serve_load.py                                   # quick digits run in a temp folder
    python benchmarks/serve_load.py --run runs/cifar10-seed_tf_tutorial-... --requests 400 --clients 16
    python benchmarks/serve_load.py --requests 50 --repeats 1          # a smoke test

Configurations:
  batching on   max_batch 32, max_wait_ms 5  (concurrent requests share one forward pass)
  batching off  max_batch 1                  (one forward pass per request)
  runtime       torch, and onnx when <run>/export/model.onnx exists or imgcls.export.export_onnx can write it
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # loopback only: this script never talks to another machine
BATCHING = {"on": {"max_batch": 32, "max_wait_ms": 5}, "off": {"max_batch": 1, "max_wait_ms": 0}}
READY_TIMEOUT = 180  # s: model loading (and a CIFAR run's imports) included
REQUEST_TIMEOUT = 60  # s per request
MAX_IMAGES = 256  # distinct images cycled through by the clients

SERVER_CODE = """
import json, sys
from imgcls.serving.app import serve
run, port, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
serve(run, host="127.0.0.1", port=port, log_level="warning", **options)
"""


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the run and its images


def train_quick_run(out: Path) -> Path:
    import imgcls

    print(f"training a quick digits run in {out} ...", flush=True)
    run = imgcls.train(out=str(out), name="digits", epochs=5, quiet=True, report=False)
    return run.path


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    pixels = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def load_images(run: Path) -> tuple[list[bytes], str]:
    """Up to MAX_IMAGES PNG-encoded images: the run's test split, else random ones at its input size."""
    import imgcls

    clf = imgcls.load(run, device="cpu")
    try:
        images = clf.dataset().splits["test"].images[:MAX_IMAGES]
        source = f"{len(images)} test images of the run's data"
    except Exception as exc:  # the data may live on another machine; the benchmark still runs
        c, h, w = clf.input_shape
        images = np.random.default_rng(0).integers(0, 256, (64, h, w, c), dtype=np.uint8)
        source = f"64 random {w}x{h} images (the run's data could not be read: {exc})"
    return [png_bytes(im) for im in images], source


def onnx_available(run: Path, wanted: bool) -> tuple[bool, str]:
    if not wanted:
        return False, "not asked for"
    if (run / "export" / "model.onnx").is_file():
        return True, "existing export/model.onnx"
    try:
        from imgcls.export import export_onnx

        export_onnx(run)
    except Exception as exc:  # onnx/onnxruntime missing, or the model does not export
        return False, f"skipped: {type(exc).__name__}: {exc}"
    return True, "exported now to export/model.onnx"


# ---------------------------------------------------------------- server


class Server:
    """``imgcls.serving.app.serve`` in a child process on a free loopback port."""

    def __init__(self, run: Path, options: dict, log_dir: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self.args = [sys.executable, "-c", SERVER_CODE, str(run), str(self.port), json.dumps(options)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"{self.url}/readyz was not ready within {READY_TIMEOUT} s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the batch_size histogram in /metrics: images and model calls so far."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            for name in ("batch_size_sum", "batch_size_count"):
                if line.startswith(name + " "):
                    values[name] = float(line.split()[1])
        return values.get("batch_size_sum", 0.0), values.get("batch_size_count", 0.0)


# ---------------------------------------------------------------- load


@dataclass
class Pass:
    """One bounded burst of requests against one server."""

    seconds: float
    latencies_ms: list[float]
    errors: int
    mean_batch: float = float("nan")
    error_samples: list[str] = field(default_factory=list)
    explained: dict[int, int] = field(default_factory=dict)  # /v1/explain answers by status, under --explanations

    @property
    def rps(self) -> float:
        return (len(self.latencies_ms) + self.errors) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def send_requests(url: str, images: list[bytes], requests: int, clients: int, explainers: int = 0) -> Pass:
    """``requests`` POST /v1/predict, one image each, from ``clients`` concurrent clients; meanwhile
    ``explainers`` more clients ask for occlusion maps (POST /v1/explain) one after the other, until the
    predictions are done (their answers are counted in ``explained``, not in the latencies)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    explained: dict[int, int] = {}
    next_index = iter(range(requests))
    predicting = True

    async def explainer(http: httpx.AsyncClient, k: int) -> None:
        while predicting:
            files = {"file": (f"img{k}.png", images[k % len(images)], "image/png")}
            try:
                status = (await http.post(f"{url}/v1/explain", params={"method": "occlusion"}, files=files)).status_code
            except httpx.HTTPError:
                status = -1
            explained[status] = explained.get(status, 0) + 1
            if status == 503:
                await asyncio.sleep(0.5)  # busy: as a client honouring Retry-After would, sooner

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:  # a shared iterator: the clients take turns until the budget is spent
            files = {"files": (f"img{i % len(images)}.png", images[i % len(images)], "image/png")}
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/predict", files=files)
                ok = response.status_code == 200
                if not ok:
                    errors.append(f"{response.status_code} {response.text[:200]}")
            except httpx.HTTPError as exc:
                ok = False
                errors.append(f"{type(exc).__name__}: {exc}")
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)

    limits = httpx.Limits(max_connections=clients + explainers, max_keepalive_connections=clients + explainers)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT, trust_env=False) as http:
        background = [asyncio.create_task(explainer(http, k)) for k in range(explainers)]
        if explainers:
            await asyncio.sleep(1.0)  # the explanations are under way before the first prediction
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
        predicting = False
        await asyncio.gather(*background)
    return Pass(seconds, latencies, len(errors), error_samples=errors[:3], explained=explained)


def measure(server: Server, images: list[bytes], args, explainers: int = 0) -> list[Pass]:
    asyncio.run(send_requests(server.url, images, min(args.requests, 4 * args.clients), args.clients))  # warm-up
    passes = []
    for _ in range(args.repeats):
        images_before, calls_before = server.batch_stats()
        result = asyncio.run(send_requests(server.url, images, args.requests, args.clients, explainers))
        images_after, calls_after = server.batch_stats()
        if calls_after > calls_before:
            result.mean_batch = (images_after - images_before) / (calls_after - calls_before)
        passes.append(result)
    return passes


# ---------------------------------------------------------------- report


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def summarise(runtime: str, batching: str, passes: list[Pass]) -> dict:
    return {
        "runtime": runtime, "batching": batching,
        "rps": [p.rps for p in passes],
        "p50_ms": [p.percentile(50) for p in passes],
        "p99_ms": [p.percentile(99) for p in passes],
        "errors": sum(p.errors for p in passes),
        "mean_batch": [p.mean_batch for p in passes],
        "error_samples": [s for p in passes for s in p.error_samples][:3],
        "explained": [p.explained for p in passes],
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'runtime':8} {'batching':8} {'requests/s':>26} {'p50 ms':>26} {'p99 ms':>26} {'errors':>6} {'batch':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        batch = statistics.median(r["mean_batch"])
        print(f"{r['runtime']:8} {r['batching']:8} {spread(r['rps'], '.1f'):>26} {spread(r['p50_ms'], '.1f'):>26} "
              f"{spread(r['p99_ms'], '.1f'):>26} {r['errors']:>6} {batch:>6.1f}")
        for sample in r["error_samples"]:
            print(f"    error: {sample}")
        if any(r["explained"]):
            print(f"    /v1/explain answers by status, each repeat: {r['explained']}")


def print_ratios(rows: list[dict]) -> None:
    by_key = {(r["runtime"], r["batching"]): r for r in rows}
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        on, off = by_key.get((runtime, "on")), by_key.get((runtime, "off"))
        if on and off:
            rps = statistics.median(on["rps"]) / statistics.median(off["rps"])
            p99 = statistics.median(on["p99_ms"]) / statistics.median(off["p99_ms"])
            print(f"{runtime}: batching on / off = {rps:.2f}x requests/s, {p99:.2f}x p99 latency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a run folder (default: train a quick digits run in a temp folder)")
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration and repeat")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per configuration (median, min, max)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--explanations", type=int, default=0, metavar="N",
                        help="also measure torch with batching on while N clients ask for occlusion maps")
    args = parser.parse_args()
    for name in ("requests", "clients", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        run = args.run.expanduser().resolve() if args.run else train_quick_run(tmp)
        if not (run / "config.yaml").is_file():
            parser.error(f"--run {run} is not a run folder (no config.yaml)")
        images, source = load_images(run)
        runtimes = ["torch"] if "torch" in args.runtimes else []
        has_onnx, onnx_note = onnx_available(run, "onnx" in args.runtimes)
        runtimes += ["onnx"] if has_onnx else []

        print(f"machine: {machine()}")
        print(f"run: {run}")
        print(f"images: {source}")
        print(f"onnx: {onnx_note}")
        print(f"load: {args.requests} requests x {args.repeats} repeats per configuration, {args.clients} clients, "
              f"1 image per request, server and clients on this machine ({HOST})")
        print("figures: median [min, max] over repeats; batch = images per model call\n", flush=True)

        rows = []
        for runtime in runtimes:
            for batching, options in BATCHING.items():
                try:
                    with Server(run, {"runtime": runtime, **options}, tmp) as server:
                        rows.append(summarise(runtime, batching, measure(server, images, args)))
                except RuntimeError as exc:  # one broken configuration should not lose the others' figures
                    print(f"  FAILED: {runtime}, batching {batching}: {exc}", file=sys.stderr, flush=True)
                    continue
                print(f"  done: {runtime}, batching {batching}", file=sys.stderr, flush=True)
        if args.explanations > 0:
            with Server(run, {"runtime": "torch", **BATCHING["on"]}, tmp) as server:
                rows.append(summarise("torch", f"on+{args.explanations}x", measure(server, images, args,
                                                                                   args.explanations)))
        print_table(rows)
        print()
        print_ratios(rows)
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "run": str(run), "images": source,
                                             "requests": args.requests, "clients": args.clients,
                                             "repeats": args.repeats, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
