"""The whole hostile-input corpus, each case in a fresh process, plus a keyed server's bad requests and an
unauthenticated flood (issue 18's figures).

    python benchmarks/hostile_inputs.py [--workers 2] [--timeout 180] [--skip-server]

CLI cases (tests/hostile/corpus.py): each runs as ``python -m imgcls.cli ARGV`` in its own process, at most
``--workers`` at a time, and is judged by corpus.judge: past ``--timeout`` s it is a hang; over its peak-RSS
bound (os.wait4's ru_maxrss of the child) a blow-up; "Traceback" on stderr a traceback; a failed post-check
(a file left under a final name, a run folder changed, a bad file not reported) or a bad input accepted
with exit 0 a silent wrong result; another exit code, or an error that is not one line naming the input,
unclear.  Cases marked xfail in the tests (known remaining bugs) are counted like any other, and listed.

Server (tests/hostile/server_corpus.py): ``imgcls serve`` of a tiny digits run with an API key, in its own
process with its own TMPDIR; every bad request of the battery on a fresh connection, then a flood of
``--flood-requests`` concurrent requests of ``--flood-files`` files of 9.9 MB each with a wrong key (issue 18
item 1: 1.22 GB written to the temp dir before the 401s), then one good request.  The server's RSS
(/proc/PID/status VmRSS) is read before and after, and its temp dir is watched for the bytes it holds.

Prints the table by kind and writes benchmarks/results/hostile_inputs.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self

from common import ROOT, machine_line, save_results

sys.path.insert(0, str(ROOT))  # the corpus lives with the tests: tests/hostile/
from tests.hostile import corpus, server_corpus

COLUMNS = {"traceback": "tracebacks", "hang": "hangs", "blow-up": "blow-ups", "silent wrong": "silent wrong",
           "unclear": "unclear", "leak": "leaks"}  # corpus.judge's verdicts -> table columns
MB = 1_000_000


def run_cases(cases: list[corpus.Case], env: dict, workers: int) -> list[dict]:
    runnable = []
    for case in cases:  # shared material (the bomb zip) is made once, before the cases run side by side
        try:
            case.setup()
            runnable.append(case)
        except corpus.CaseUnsupported as exc:
            print(f"  skipped {case.id}: {exc}")
    cases = runnable
    rows = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(corpus.run_subprocess, case, env): case for case in cases}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            case = futures[future]
            outcome = future.result()
            problems = corpus.judge(case, outcome)
            rows.append({"id": case.id, "kind": case.kind, "argv": list(case.argv), "expected_code": case.code,
                         "code": outcome.code, "peak_rss_mb": round(outcome.peak_rss_mb or 0, 1),
                         "rss_bound_mb": case.max_rss_mb, "seconds": round(outcome.seconds, 2),
                         "verdict": problems[0][0] if problems else "clean",
                         "problems": [f"{k}: {d}" for k, d in problems], "known_bug": case.xfail})
            if done % 25 == 0:
                print(f"  {done}/{len(cases)} cases run", flush=True)
    return sorted(rows, key=lambda r: r["id"])


def print_cli_table(rows: list[dict]) -> dict:
    header = f"{'kind':<12} {'tried':>5} {'clean':>5} " + " ".join(f"{c:>12}" for c in COLUMNS.values())
    print(header)
    print("-" * len(header))
    table = {}
    for kind in [*corpus.KINDS, "total"]:
        mine = [r for r in rows if kind in (r["kind"], "total")]
        counts = Counter(r["verdict"] for r in mine)
        table[kind] = {"tried": len(mine), "clean": counts["clean"], **{c: counts[c] for c in COLUMNS}}
        if kind == "total":
            print("-" * len(header))
        print(f"{kind:<12} {len(mine):>5} {counts['clean']:>5} " + " ".join(f"{counts[c]:>12}" for c in COLUMNS))
    return table


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((server_corpus.HOST, 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> dict:
    """VmRSS and VmHWM (peak) of a process, MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / MB
    return fields


def io_counters(pid: int) -> dict:
    """/proc/PID/io: wchar (bytes passed to write(), sockets included) and write_bytes (sent to storage)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {k: int(fields[k]) for k in ("wchar", "write_bytes")}


def temp_bytes(folder: Path, pid: int) -> int:
    """Bytes in the files under ``folder``, and in the files there that ``pid`` holds open without a name
    (Python's TemporaryFile, which Starlette spools uploads to, is O_TMPFILE on Linux: never listed)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed while walking
                total += os.lstat(os.path.join(dirpath, name)).st_size
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(str(folder)) and not os.path.exists(target):  # unnamed or deleted
                    total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
    return total


class Watch:
    """Sample the bytes a server holds in its temp dir every 20 ms in a thread; the most seen."""

    def __init__(self, folder: Path, pid: int):
        self.folder, self.pid, self.peak, self._stop = folder, pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, temp_bytes(self.folder, self.pid))
            time.sleep(0.02)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, temp_bytes(self.folder, self.pid))


def start_server(run: Path, work: Path, env: dict) -> tuple[subprocess.Popen, int, Path]:
    import httpx

    key_file, server_tmp, log = work / "key.txt", work / "server-tmp", work / "server.log"
    key_file.write_text(server_corpus.KEY + "\n")
    server_tmp.mkdir()
    port = free_port()
    with open(log, "wb") as out:  # the child keeps its own copy of the file open
        proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", "serve", str(run), "--port", str(port),
                                 "--api-key-file", str(key_file), "--client-timeout", "5"],
                                env={**env, "TMPDIR": str(server_tmp)}, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"imgcls serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://{server_corpus.HOST}:{port}/readyz", timeout=2).status_code == 200:
                return proc, port, server_tmp
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"imgcls serve was not ready within 120 s:\n{log.read_text()[-3000:]}")


def flood_one(port: int, files: int, file_bytes: int, out: dict) -> None:
    """One request of ``files`` files of ``file_bytes`` zeros with a wrong key, streamed; what came back."""
    parts_head = [(f"--{server_corpus.BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; "
                   f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n").encode() for i in range(files)]
    closing = f"--{server_corpus.BOUNDARY}--\r\n".encode()
    length = sum(len(h) + file_bytes + 2 for h in parts_head) + len(closing)
    head = server_corpus.head("POST", "/v1/predict", length=length, key="wrong-key")
    chunk = memoryview(bytes(1 << 20))
    started, sent, received = time.monotonic(), 0, bytearray()
    sock = socket.create_connection((server_corpus.HOST, port), timeout=60)

    def read() -> None:
        try:
            while data := sock.recv(1 << 16):
                received.extend(data)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(head.encode() + b"\r\n\r\n")
        for part in parts_head:
            sock.sendall(part)
            left = file_bytes
            while left > 0:
                n = min(left, len(chunk))
                sock.sendall(chunk[:n])
                sent, left = sent + n, left - n
            sock.sendall(b"\r\n")
        sock.sendall(closing)
    except OSError as exc:
        out["send_error"] = exc.__class__.__name__
    reader.join(60)
    sock.close()
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/") else None
    out.update(status=status, announced_bytes=length, sent_bytes=sent, seconds=round(time.monotonic() - started, 3))


def run_server(run: Path, work: Path, env: dict, args) -> dict:
    proc, port, server_tmp = start_server(run, work, env)
    secrets = (str(run), str(ROOT))
    try:
        good = server_corpus.good_request()
        warm = server_corpus.send(port, good)
        before = rss_mb(proc.pid)
        rows = []
        with Watch(server_tmp, proc.pid) as battery_watch:
            for req in server_corpus.battery():
                answer = server_corpus.send(port, req)
                problems = server_corpus.judge_answer(req, answer, secrets)
                rows.append({"id": req.id, "kind": req.kind, "expected": list(req.expect), "status": answer.status,
                             "dropped": answer.dropped, "seconds": round(answer.seconds, 3),
                             "verdict": problems[0][0] if problems else "clean",
                             "problems": [f"{k}: {d}" for k, d in problems]})
        after_battery = rss_mb(proc.pid)
        answers = [{} for _ in range(args.flood_requests)]
        file_bytes = int(args.flood_file_mb * MB)
        io_before = io_counters(proc.pid)
        with Watch(server_tmp, proc.pid) as flood_watch:
            threads = [threading.Thread(target=flood_one, args=(port, args.flood_files, file_bytes, a))
                       for a in answers]
            flood_started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            flood_seconds = time.monotonic() - flood_started
        after = rss_mb(proc.pid)
        io_after = io_counters(proc.pid)
        final = server_corpus.send(port, good)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = (work / "server.log").read_text(errors="replace")
    return {"battery": rows, "rss_mb": {"before": before, "after_battery": after_battery, "after_flood": after},
            "warm_status": warm.status, "final_good_status": final.status,
            "temp_dir_peak_bytes": {"battery": battery_watch.peak, "flood": flood_watch.peak},
            "flood_io_bytes": {k: io_after[k] - io_before[k] for k in io_before},
            "log_tracebacks": log.count("Traceback"),
            "flood": {"requests": args.flood_requests, "files_each": args.flood_files,
                      "file_mb": args.flood_file_mb, "answers": answers, "seconds": round(flood_seconds, 3)}}


def print_server(result: dict) -> dict:
    rows = result["battery"]
    counts = Counter(r["verdict"] for r in rows)
    kinds = ("server error", "dropped", "wrong status", "leak")
    header = f"{'requests':<12} {'tried':>5} {'clean':>5} " + " ".join(f"{k:>12}" for k in kinds)
    print(header)
    print("-" * len(header))
    for kind in sorted({r["kind"] for r in rows}):
        c = Counter(r["verdict"] for r in rows if r["kind"] == kind)
        print(f"{kind:<12} {sum(c.values()):>5} {c['clean']:>5} " + " ".join(f"{c[k]:>12}" for k in kinds))
    print("-" * len(header))
    print(f"{'total':<12} {len(rows):>5} {counts['clean']:>5} " + " ".join(f"{counts[k]:>12}" for k in kinds))
    flood = result["flood"]
    statuses = Counter(str(a.get("status")) for a in flood["answers"])
    announced = sum(a["announced_bytes"] for a in flood["answers"])
    sent = sum(a.get("sent_bytes", 0) for a in flood["answers"])
    io = result["flood_io_bytes"]
    print(f"\nflood: {flood['requests']} concurrent requests x {flood['files_each']} files x {flood['file_mb']} MB "
          f"with a wrong key ({announced / MB:,.0f} MB announced; the clients got {sent / MB:,.1f} MB of file data "
          f"out in whole 1-MB writes before the server closed): statuses {dict(statuses)} in {flood['seconds']:.2f} s; its temp dir held at most "
          f"{result['temp_dir_peak_bytes']['flood']:,} bytes; it wrote {io['wchar']:,} bytes (write(), sockets "
          f"included), {io['write_bytes']:,} to storage.  (During the battery, whose keyed requests may be spooled: "
          f"{result['temp_dir_peak_bytes']['battery']:,} bytes at most in its temp dir.)")
    rss = result["rss_mb"]
    print(f"server RSS: before {rss['before']['VmRSS']:.0f} MB, after the battery "
          f"{rss['after_battery']['VmRSS']:.0f} MB, after the flood {rss['after_flood']['VmRSS']:.0f} MB "
          f"(peak {rss['after_flood']['VmHWM']:.0f} MB); a good request after it all: {result['final_good_status']}; "
          f"tracebacks in the server log: {result['log_tracebacks']}")
    return {"tried": len(rows), "clean": counts["clean"], **{k: counts[k] for k in kinds}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="CLI cases run side by side (default: 2)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds before a case counts as a hang")
    parser.add_argument("--skip-server", action="store_true", help="only the CLI cases")
    parser.add_argument("--only", help="only the CLI cases whose id holds this text (a smoke test)")
    parser.add_argument("--flood-requests", type=int, default=4)
    parser.add_argument("--flood-files", type=int, default=32)
    parser.add_argument("--flood-file-mb", type=float, default=9.9)
    args = parser.parse_args()
    print(f"machine: {machine_line()}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imgcls-hostile-") as tmp:
        work = Path(tmp)
        env = corpus.child_env(data_dir=str(work / "data"))
        subprocess.run([sys.executable, "-m", "imgcls.cli", *corpus.base_run_argv(work / "runs")], env=env,
                       check=True, capture_output=True, timeout=600)
        base = work / "runs" / "base"
        cases = [dataclasses.replace(c, timeout=args.timeout) for c in corpus.build_corpus(work / "corpus", base)
                 if args.only is None or args.only in c.id]
        print(f"{len(cases)} hostile CLI inputs, each in a fresh process, {args.workers} at a time ...", flush=True)
        rows = run_cases(cases, env, args.workers)
        print()
        table = print_cli_table(rows)
        bad = [r for r in rows if r["verdict"] != "clean"]
        if bad:
            print(f"\nnot clean ({len(bad)}; 'known' = marked xfail in tests/hostile, with its reason):")
            for r in bad:
                print(f"  {r['id']}: {r['problems'][0][:160]}" + ("  [known]" if r["known_bug"] else "  [NEW]"))
        server = None
        if not args.skip_server:
            print()
            server = run_server(base, work, env, args)
            server["table"] = print_server(server)
    doc = {"workers": args.workers, "only": args.only, "timeout_s": args.timeout, "seconds": round(time.monotonic() - started, 1),
           "cli": {"table": table, "cases": rows}, "server": server}
    print(f"\n{time.monotonic() - started:.0f} s in all; raw results: {save_results('hostile_inputs', doc)}")


if __name__ == "__main__":
    main()
