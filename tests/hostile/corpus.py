"""A corpus of hostile inputs for the ``imgcls`` command line, made by code in a temporary folder.

Each :class:`Case` is one bad input and what imgcls must do with it: the
command line, the exit code, the words of its one-line error (the input's name
at least), a peak-memory bound where memory is the risk, and what must (not)
be on disk afterwards.  :func:`build_corpus` lists the cases without writing a
byte; a case's files are made by its ``setup()``, when it is about to run, so
the list is cheap to build (pytest parametrises over it at collection).

:func:`judge` holds the rules, shared by ``tests/hostile/test_corpus.py``
(in-process, fast) and ``benchmarks/hostile_inputs.py`` (every case in a
fresh process): a case is clean when none of these is found:

* ``traceback``: "Traceback" on stderr (or an exception out of ``main``);
* ``hang``: the command ran past its time limit;
* ``blow-up``: its peak RSS went over the case's bound;
* ``silent wrong``: a post-check failed (a file left under a final name,
  data changed or lost, a bad member not reported), or the input was
  accepted (exit 0) where it must be refused;
* ``unclear``: another exit code, or an error that is not one line naming
  the input.

The cases about symbolic links, slow clients, single-image classes,
``--test-fraction 0`` and the summary of thousands of bad zip members are left
out on purpose: that behaviour is being changed elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

SRC = Path(__file__).resolve().parents[2] / "src"  # the imgcls tree these tests belong to
KINDS = ("config", "cli-args", "checkpoint", "data-zip", "data-folder", "run-folder")
MAX_ERROR_CHARS = 600  # an error line longer than this is a dump, not a message (an alias bomb printed 398 MB)
SMALL = ("--model-option", "widths=[8,8,8]")  # a small fastnet: a training case takes a second or two
RSS_BOUND_MB = 600  # MB: imgcls on tiny data peaks at 225-380 here; a member of 1 GiB inflated is far past it


class CaseUnsupported(Exception):
    """This machine cannot make the case's files (a file system that refuses names that are not UTF-8)."""


@dataclass(frozen=True)
class Case:
    """One hostile input and the behaviour expected of ``imgcls``.

    Attributes:
        kind: what is hostile: config, cli-args, checkpoint, data-zip, data-folder or run-folder.
        name: short, unique within ``kind``.
        argv: the ``imgcls`` arguments (no program name).
        code: the expected exit status (2 refused, 1 some inputs unreadable, 0 handled).
        expect: words the one-line error must hold (the input's name at least); for an exit 0, words
            stderr must hold.
        avoid: words the error must not hold (a misleading message).
        secrets: credentials given in the input, which must appear nowhere in stdout or stderr.
        max_rss_mb: peak RSS bound of the whole process, MB (None: memory is not the risk).
        setup: makes the case's files; idempotent.
        check: after the run, what is wrong on disk (a file left under a final name, data lost), or None.
        hold: a context manager held around the run (a run folder locked by another process).
        watch: folders that must be byte-for-byte unchanged by the run.
        unwatched: file names under ``watch`` that may change (``.lock``: a refused resume may rewrite its PID).
        lists_files: the error line may be followed by an indented list of the unreadable files it is about.
        xfail: a remaining bug this case still shows (why), or None.
        timeout: seconds before the run counts as a hang (subprocess runs).
    """

    kind: str
    name: str
    argv: tuple[str, ...]
    code: int
    expect: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()  # credentials in the input that must appear in no output
    max_rss_mb: float | None = None
    setup: Callable[[], None] = lambda: None
    check: Callable[[], str | None] | None = None
    hold: Callable[[], contextlib.AbstractContextManager] | None = None
    watch: tuple[Path, ...] = ()
    unwatched: tuple[str, ...] = (".lock",)
    lists_files: bool = False
    xfail: str | None = None
    timeout: float = 300.0

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"

    def snapshot(self) -> dict[str, str]:
        """Every file under ``watch`` with its SHA-256, the names in ``unwatched`` aside."""
        return {str(p): _sha256(p) for root in self.watch for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in self.unwatched}


@dataclass
class Outcome:
    """What one run of a case gave."""

    code: int | None
    stderr: str
    peak_rss_mb: float | None = None
    timed_out: bool = False
    seconds: float = 0.0
    post: list[str] = field(default_factory=list)  # what the post-checks found wrong
    stdout: str = ""


PROBLEMS = ("traceback", "hang", "blow-up", "silent wrong", "unclear", "leak")


def judge(case: Case, outcome: Outcome) -> list[tuple[str, str]]:
    """The problems of ``outcome`` as (one of :data:`PROBLEMS`, detail); empty when the case was handled cleanly."""
    found: list[tuple[str, str]] = []
    err = outcome.stderr
    if outcome.timed_out:
        found.append(("hang", f"still running after {case.timeout:.0f} s"))
    if "Traceback" in err:
        found.append(("traceback", _tail(err)))
    if case.max_rss_mb is not None and outcome.peak_rss_mb is not None and outcome.peak_rss_mb > case.max_rss_mb:
        found.append(("blow-up", f"peak RSS {outcome.peak_rss_mb:,.0f} MB, bound {case.max_rss_mb:,.0f} MB"))
    crashed = outcome.timed_out or "Traceback" in err  # its exit code and message say nothing more
    if not crashed and outcome.code != case.code:
        kind = "silent wrong" if outcome.code == 0 else "unclear"  # exit 0: a bad input taken as good
        found.append((kind, f"exit {outcome.code}, expected {case.code}: {_tail(err)}"))
    found += [("silent wrong", p) for p in outcome.post]
    if leaked := [w for w in case.secrets if w in err or w in outcome.stdout]:
        found.append(("leak", f"{leaked} shown on the terminal"))
    if "\x1b" in err or "\x1b" in outcome.stdout:  # from a file or class name: it would act on the terminal
        found.append(("unclear", "a raw escape character (\\x1b) written to the terminal"))
    if crashed or outcome.code != case.code:
        return found
    if case.code != 0:
        found += [("unclear", p) for p in message_problems(case, err)]
    else:
        if missing := [w for w in case.expect if w not in err]:
            found.append(("unclear", f"stderr lacks {missing}: {_tail(err)}"))
        if stray := [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]:
            found.append(("unclear", (f"{len(stray)} line(s) on stderr of a run that succeeded, such as "
                                      f"{stray[0][:200]!r}")))
    return found


def message_problems(case: Case, stderr: str) -> list[str]:
    """What is wrong with the error of a refused case: it must be the last line, name the input, be short.

    Lines before it may only be argparse's usage block, ``note:`` lines and, for exit 1 (some inputs could not
    be read), one ``error:`` line per unreadable input.
    """
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    while case.lists_files and len(lines) > 1 and lines[-1].startswith("  "):
        lines.pop()
    if not lines:
        return ["no error message on stderr"]
    last, before = lines[-1], lines[:-1]
    if before and before[0].startswith("usage:"):  # argparse: a usage block, indented continuation lines
        before = before[1:]
        while before and before[0][:1].isspace():
            before = before[1:]
    problems = []
    stray = [ln for ln in before if not (ln.startswith("note:") or case.code == 1 and ln.startswith("error:"))]
    if stray:
        problems.append(f"the error is not one line: {len(stray)} other line(s) such as {stray[0][:150]!r}")
    if "error:" not in last:
        problems.append(f"the last line is not an error: {last[:200]!r}")
    if missing := [w for w in case.expect if w not in last]:
        problems.append(f"the error does not name {missing}: {last[:300]!r}")
    if present := [w for w in case.avoid if w in last]:
        problems.append(f"the error says {present}, which is misleading here: {last[:300]!r}")
    if len(last) > MAX_ERROR_CHARS:
        problems.append(f"the error line is {len(last):,} characters long")
    return problems


def post_checks(case: Case, before: dict[str, str]) -> list[str]:
    """Run the case's own check and compare the watched folders with ``before`` (:meth:`Case.snapshot`)."""
    problems = []
    after = case.snapshot()
    if changed := sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)):
        problems.append(f"{len(changed)} file(s) changed, added or lost in watched folders, e.g. {changed[0]}")
    if case.check is not None and (found := case.check()):
        problems.append(found)
    return problems


def _tail(text: str, lines: int = 4) -> str:
    return " | ".join(ln for ln in text.strip().splitlines()[-lines:])[:600]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- running a case in a fresh process


def child_env(data_dir: str | None = None) -> dict[str, str]:
    """The environment of a child ``imgcls``: this tree's src first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    if data_dir is not None:
        env["IMGCLS_DATA_DIR"] = data_dir
    return env


# ``python -c`` that runs ``imgcls.cli`` as ``python -m`` would, its address space capped, and writes its peak
# RSS (VmHWM, KiB) to a file at exit.  Not ru_maxrss: Linux carries the parent's RSS high-water mark over fork
# and exec into it, so a child of a 600-MB pytest reports at least 600 MB whatever it does.
_LAUNCHER = """
import atexit, resource, runpy, sys
def peak():
    with open('/proc/self/status') as status, open({out!r}, 'w') as out:
        out.write(next(ln.split()[1] for ln in status if ln.startswith('VmHWM:')))
atexit.register(peak)
if {cap}:
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
runpy.run_module('imgcls.cli', run_name='__main__', alter_sys=True)
"""


def run_subprocess(case: Case, env: dict[str, str] | None = None) -> Outcome:
    """Run ``case`` as ``python -m imgcls.cli ARGV`` in a fresh process: exit code, stderr, peak RSS.

    The peak RSS is the child's own (its VmHWM at exit; ``os.wait4``'s where it did not get to write it).
    A case with an RSS bound has its address space capped (8x the bound, at least 6 GiB) so that a blow-up
    fails there instead of taking the machine down; a case past ``case.timeout`` is killed, a hang.
    """
    case.setup()
    before = case.snapshot()
    cap = 0 if case.max_rss_mb is None else int(max(6 * 1024, 8 * case.max_rss_mb) * 1024 * 1024)
    fd, peak_file = tempfile.mkstemp(prefix="imgcls-peak-")
    os.close(fd)
    argv = [sys.executable, "-c", _LAUNCHER.format(out=peak_file, cap=cap), *case.argv]
    started = time.monotonic()
    with (case.hold() if case.hold else contextlib.nullcontext()):
        proc = subprocess.Popen(argv, env=env or child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(case.timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
        proc.stderr.close()
    with open(peak_file) as fh:
        written = fh.read().strip()
    os.unlink(peak_file)
    peak_kib = int(written) if written.isdigit() else usage.ru_maxrss
    outcome = Outcome(code=None if timed_out.is_set() else proc.returncode,
                      stderr=b"".join(chunks).decode(errors="replace"), peak_rss_mb=peak_kib / 1024,
                      timed_out=timed_out.is_set(), seconds=time.monotonic() - started)
    outcome.post = post_checks(case, before)
    return outcome


# ---------------------------------------------------------------- small files made by code


def png_bytes(side: int = 12, base: int = 128, seed: int = 0, channels: int = 3) -> bytes:
    """A small noisy PNG around the grey level ``base``."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (side, side, 3) if channels == 3 else (side, side)
    buf = io.BytesIO()
    Image.fromarray(rng.normal(base, 20, shape).clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_class_folders(root: Path, per_class: int = 16, classes: dict[str, int] | None = None) -> Path:
    """``root/<class>/<i>.png``: two classes (dark, light) of small noisy images, easy to tell apart."""
    for cls, base in (classes or {"dark": 40, "light": 200}).items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"{i}.png").write_bytes(png_bytes(base=base, seed=i))
    return root


@dataclass
class ZipMember:
    """One member of a zip written by :func:`write_zip`: raw (already compressed) bytes and the header fields."""

    name: str | bytes
    payload: bytes
    method: int
    crc: int
    size: int
    flags: int = 0

    @classmethod
    def of(cls, name: str | bytes, content: bytes, deflate: bool = True) -> ZipMember:
        if deflate:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            return cls(name, c.compress(content) + c.flush(), 8, zlib.crc32(content), len(content))
        return cls(name, content, 0, zlib.crc32(content), len(content))

    @classmethod
    def zeros(cls, name: str, size: int) -> ZipMember:
        """``size`` zero bytes deflated (about 1,000:1) without compressing them all: one full-flushed MiB block,
        repeated (a full flush resets the compressor, so every MiB compresses to the same bytes)."""
        mib = 1 << 20
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
        whole, rest = divmod(size, mib)
        payload = block * whole + c.compress(bytes(rest)) + c.flush()
        crc = 0
        for _ in range(whole):
            crc = zlib.crc32(bytes(mib), crc)
        return cls(name, payload, 8, zlib.crc32(bytes(rest), crc), size)


def write_zip(path: Path, members: list[ZipMember], declared: dict[str, int] | None = None,
              cd_offset_shift: int = 0) -> Path:
    """A zip file written field by field, so that a test can make it lie.

    ``declared``: member name -> the uncompressed size its headers claim (instead of the true one);
    ``cd_offset_shift``: added to the central directory's offset in the end record (a damaged directory).
    """
    declared = declared or {}
    out = bytearray()
    central = bytearray()
    for m in members:
        name = m.name.encode() if isinstance(m.name, str) else m.name
        size = declared.get(m.name if isinstance(m.name, str) else m.name.decode("latin-1"), m.size)
        flags = m.flags | (0x800 if isinstance(m.name, str) and not m.name.isascii() else 0)
        offset = len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, m.method, 0, 0x21, m.crc, len(m.payload),
                           size, len(name), 0) + name + m.payload
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, flags, m.method, 0, 0x21, m.crc,
                               len(m.payload), size, len(name), 0, 0, 0, 0, 0, offset) + name
    start = len(out)
    out += central + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central),
                                 start + cd_offset_shift, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path


def image_members(per_class: int = 16, prefix: str = "") -> list[ZipMember]:
    return [ZipMember.of(f"{prefix}{cls}/{i}.png", png_bytes(base=base, seed=i), deflate=False)
            for cls, base in (("dark", 40), ("light", 200)) for i in range(per_class)]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring ``width`` x ``height`` 8-bit grey pixels, and no pixels (58 bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


def png_pixel_bomb(side: int = 12_000) -> bytes:
    """A real, decodable 8-bit grey PNG of ``side`` x ``side`` black pixels (144 MB decoded, ~150 KB on disk)."""
    row = side + 1  # a filter byte, then the pixels
    total, mib = row * side, 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(total, mib)
    adler = 1
    for _ in range(whole):
        adler = zlib.adler32(bytes(mib), adler)
    adler = zlib.adler32(bytes(rest), adler)
    idat = b"\x78\xda" + block * whole + c.compress(bytes(rest)) + c.flush() + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- checkpoints damaged by code


def tensor_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (8-byte header length, then the JSON header)."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def flip_bytes(where: str, count: int = 4) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        start = tensor_data_offset(path)
        at = {"first": start, "middle": (start + len(data)) // 2, "last": len(data) - count}[where]
        data[at:at + count] = bytes(b ^ 0x5A for b in data[at:at + count])
        path.write_bytes(bytes(data))
    return damage


def flip_4k(path: Path) -> None:
    """4 KiB of the weights flipped, as in issue 18 (97.8% -> 66.5% test accuracy, loaded without complaint)."""
    data = bytearray(path.read_bytes())
    start = tensor_data_offset(path)
    n = min(4096, len(data) - start)
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


def truncate_to(fraction: float) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
    return damage


def header_length(value: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value) + data[8:])
    return damage


def garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    n = tensor_data_offset(path) - 8
    data[8:8 + n] = bytes((i * 7919) % 251 for i in range(n))
    path.write_bytes(bytes(data))


def _read_st(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118 - not a dict


def _write_st(path: Path, tensors, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def raw_meta(text: str) -> Callable[[Path], None]:
    """Replace the imgcls metadata document by ``text``; the tensors stay as they were."""
    def damage(path: Path) -> None:
        tensors, header = _read_st(path)
        _write_st(path, tensors, {**header, "imgcls": text})
    return damage


def edit_meta(edit: Callable[[dict], None], tensors_edit: Callable[[dict], None] | None = None,
              rehash: bool = False) -> Callable[[Path], None]:
    """Change the metadata (and optionally the tensors) as a hand or another tool might.

    ``rehash``: store a checksum that matches the changed tensors (an edit made with knowledge of the format).
    """
    def damage(path: Path) -> None:
        tensors, header = _read_st(path)
        doc = json.loads(header["imgcls"])
        if tensors_edit is not None:
            tensors_edit(tensors)
        if rehash:
            from imgcls.checkpoint import tensors_digest

            doc["tensors_sha256"] = tensors_digest(tensors)
        edit(doc)
        _write_st(path, tensors, {**header, "imgcls": json.dumps(doc)})
    return damage


def _drop(*keys: str) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        for k in keys:
            doc.pop(k, None)
    return edit


def _put(**values) -> Callable[[dict], None]:
    return lambda doc: doc.update(values)


def _put_norm(mean, std) -> Callable[[dict], None]:
    return lambda doc: doc.update(normalize={"mean": mean, "std": std})


def _drop_tensor(tensors: dict) -> None:
    tensors.pop(next(k for k in sorted(tensors) if k.startswith("model.") and k.endswith("weight")))


def _nan_weights(tensors: dict) -> None:
    k = next(k for k in sorted(tensors) if k.startswith("model.") and k.endswith("weight"))
    tensors[k] = tensors[k].clone().fill_(float("nan"))


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


class Damage(NamedTuple):
    """One way to damage a checkpoint, and the words of the error it must give."""

    fn: Callable[[Path], None]
    words: tuple[str, ...]
    skip: frozenset[str] = frozenset()  # commands the damage does not concern
    bugs: dict[str, str] | None = None  # command -> the remaining bug it shows there
    words_for: dict[str, tuple[str, ...]] | None = None  # command -> its own words, where they differ


# Resume rebuilds the model from the run's config.yaml and takes only the weights and the training state from
# the checkpoint, so metadata that names another model or other classes does not concern it.
NOT_RESUME = frozenset({"resume"})
CHECKPOINT_DAMAGE: dict[str, Damage] = {
    "flip-first-4-bytes": Damage(flip_bytes("first"), ("is damaged",)),
    "flip-middle-4-bytes": Damage(flip_bytes("middle"), ("is damaged",)),
    "flip-last-4-bytes": Damage(flip_bytes("last"), ("is damaged",)),
    "flip-4-KiB": Damage(flip_4k, ("is damaged",)),
    "truncated-half": Damage(truncate_to(0.5), ("cannot be read",)),
    "truncated-to-header": Damage(truncate_to(0.02), ("cannot be read",)),
    "zero-bytes": Damage(truncate_to(0.0), ("cannot be read",)),
    "header-length-2^63": Damage(header_length(1 << 63), ("cannot be read",)),
    "header-garbage": Damage(garbage_header, ("cannot be read",)),
    "meta-not-json": Damage(raw_meta("{not json"), ("not valid JSON",)),
    "meta-empty-string": Damage(raw_meta(""), ("not valid JSON",)),
    "meta-list": Damage(raw_meta("[1, 2]"), ("is a list, not a mapping",)),
    "meta-null": Damage(raw_meta("null"), ("not a mapping",)),
    "meta-number": Damage(raw_meta("42"), ("not a mapping",)),
    "meta-nested-100k": Damage(raw_meta("[" * 100_000 + "]" * 100_000), ("not valid JSON",)),
    "meta-nested-dicts": Damage(raw_meta(nested(5000)), ("not valid JSON",)),
    "no-imgcls-metadata": Damage(lambda p: _write_st(p, _read_st(p)[0], {"other": "x"}), ("no imgcls metadata",)),
    "missing-classes": Damage(edit_meta(_drop("classes")), ("'classes' must be a list",)),
    "classes-null": Damage(edit_meta(_put(classes=None)), ("'classes' must be a list",)),
    "classes-numbers": Damage(edit_meta(_put(classes=list(range(10)))), ("'classes' must be a list",)),
    "classes-one": Damage(edit_meta(_put(classes=["only"])), ("'classes' must be a list",)),
    "classes-wrong-count": Damage(edit_meta(_put(classes=["a", "b", "c"])), ("does not match",), NOT_RESUME),
    "missing-input-shape": Damage(edit_meta(_drop("input_shape")), ("'input_shape' must be",)),
    "input-shape-huge": Damage(edit_meta(_put(input_shape=[1, 10**9, 10**9])), ("'input_shape' must be",)),
    "input-shape-negative": Damage(edit_meta(_put(input_shape=[1, -8, 8])), ("'input_shape' must be",)),
    "input-shape-2-channels": Damage(edit_meta(_put(input_shape=[2, 8, 8])), ("'input_shape' must be",)),
    "input-shape-strings": Damage(edit_meta(_put(input_shape=["1", "8", "8"])), ("'input_shape' must be",)),
    "missing-arch": Damage(edit_meta(_drop("arch")), ("'arch' must name a model",)),
    "arch-unknown": Damage(edit_meta(_put(arch="vgg99")), ("vgg99",), NOT_RESUME),
    "arch-kwargs-list": Damage(edit_meta(_put(arch_kwargs=[1])), ("'arch_kwargs' must be a mapping",)),
    "arch-option-wrong-type": Damage(edit_meta(_put(arch_kwargs={"widths": "abc"})), ("widths",), NOT_RESUME),
    "arch-option-unknown": Damage(edit_meta(_put(arch_kwargs={"depth": 3})), ("depth",), NOT_RESUME),
    "temperature-negative": Damage(edit_meta(_put(temperature=-1.0)), ("'temperature' must be a positive number",)),
    "temperature-zero": Damage(edit_meta(_put(temperature=0)), ("'temperature' must be a positive number",)),
    "temperature-nan": Damage(edit_meta(_put(temperature=float("nan"))), ("'temperature' must be a positive number",)),
    "temperature-string": Damage(edit_meta(_put(temperature="warm")), ("'temperature' must be a positive number",)),
    "temperature-bool": Damage(edit_meta(_put(temperature=True)), ("'temperature' must be a positive number",)),
    "std-zero": Damage(edit_meta(_put_norm([0.5], [0.0])), ("positive 'std'",)),
    "std-negative": Damage(edit_meta(_put_norm([0.5], [-1.0])), ("positive 'std'",)),
    "std-1e-300": Damage(edit_meta(_put_norm([0.5], [1e-300])), ("'std'",)),
    "mean-1e308": Damage(edit_meta(_put_norm([1e308], [1.0])), ("'mean'",)),
    "mean-string": Damage(edit_meta(_put_norm(["a"], [1.0])), ("positive 'std'",)),
    "normalize-list": Damage(edit_meta(_put(normalize=[0.5, 0.25])), ("'normalize' must hold",)),
    "thresholds-short": Damage(edit_meta(_put(thresholds=[0.5])), ("'thresholds' must be",)),
    "resize-number": Damage(edit_meta(_put(resize=3)), ("'resize' must be a string",)),
    "format-version-99": Damage(edit_meta(_put(format_version=99)), ("format version 99",)),
    "checksum-wrong": Damage(edit_meta(_put(tensors_sha256="0" * 64)), ("is damaged",)),
    "weight-dropped-rehashed": Damage(edit_meta(lambda d: None, _drop_tensor, rehash=True), ("does not match",)),
    "nan-weights-rehashed": Damage(edit_meta(lambda d: None, _nan_weights, rehash=True), ("NaN",)),
}
# Each damage is tried against these commands (RUN: a copy of the base run with both checkpoints damaged).
CHECKPOINT_COMMANDS = {
    "evaluate": lambda run, d: ["evaluate", str(run)],
    "predict": lambda run, d: ["predict", str(run), str(d / "digit.png")],
    "export": lambda run, d: ["export", str(run), "--out", str(d / "export" / "model.onnx")],
    "resume": lambda run, d: ["train", "--resume", str(run), "--epochs", "3", "--quiet"],
}


def damaged_run(base: Path, dest: Path, damage: Callable[[Path], None]) -> Path:
    """A copy of ``base`` with ``damage`` done to both of its checkpoints."""
    if not dest.exists():
        shutil.copytree(base, dest)
        for ckpt in sorted((dest / "checkpoints").glob("*.safetensors")):
            damage(ckpt)
    return dest


# ---------------------------------------------------------------- the corpus


def base_run_argv(out: Path, name: str = "base") -> list[str]:
    """The tiny run every checkpoint and run-folder case starts from: digits, 1 epoch, a small fastnet."""
    return ["train", "--epochs", "1", "--out", str(out), "--name", name, "--quiet", "--no-report", *SMALL]


def build_corpus(root: Path, base_run: Path) -> list[Case]:
    """Every case, with its files to be made under ``root``; ``base_run``: a run made by :func:`base_run_argv`."""
    root = Path(root)
    cases = (config_cases(root / "config") + cli_cases(root / "cli", base_run)
             + checkpoint_cases(root / "checkpoint", base_run) + zip_cases(root / "zip", base_run)
             + folder_cases(root / "folder", base_run) + run_folder_cases(root / "run", base_run))
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    return cases


def _absent(*paths: Path) -> Callable[[], str | None]:
    """No file (or folder) under these names after the run."""
    def check() -> str | None:
        left = [str(p) for p in paths if p.exists() and (p.is_file() or any(p.iterdir()))]
        return f"left behind: {', '.join(left)}" if left else None
    return check


_PRECIOUS = {"checkpoints/best.safetensors": b"not imgcls's: a user's own file", "eval_test.csv": b"a,b\n1,2\n",
             "metrics.jsonl": b'{"mine": true}\n', "notes.txt": b"keep me\n"}


def _plain_folder_like_a_run(folder: Path) -> Callable[[], None]:
    """A folder imgcls did not make, holding files named like a run's (no config.yaml)."""
    def setup() -> None:
        for rel, content in _PRECIOUS.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(content)
    return setup


def _untouched_and_beside(folder: Path, new_run: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        for rel, content in _PRECIOUS.items():
            if (folder / rel).read_bytes() != content:
                return f"{rel} in a folder imgcls did not make was overwritten"
        extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                       and str(p.relative_to(folder)) not in _PRECIOUS)
        if extra:
            return f"the run wrote into a folder it did not make: {extra[:5]}"
        return None if (new_run / "run.json").is_file() else f"no run in {new_run.name} beside it"
    return check


def _copy_without(base: Path, dest: Path, rel: str, image: Path) -> Callable[[], None]:
    def setup() -> None:
        if not dest.exists():
            shutil.copytree(base, dest)
            (dest / rel).unlink()
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(png_bytes(side=8, channels=1))
    return setup


def _same_as(path: Path, original: Path) -> Callable[[], str | None]:
    """``path`` holds what ``original`` holds after the run (a refused command changed nothing)."""
    def check() -> str | None:
        return None if path.read_bytes() == original.read_bytes() else f"{path} changed"
    return check


def _write(path: Path, content: bytes | str) -> Callable[[], None]:
    def setup() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def alias_bomb(levels: int = 9, where: str = "augment") -> str:
    """Nested YAML aliases: 10 ** levels strings once expanded (the issue's took 91 s and 7.4 GB).

    The anchors sit under model.options; ``where="augment"`` also points train.augment at the last one.
    """
    lines = ["model:", "  options:", '    k0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels + 1):
        lines.append(f"    k{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    if where == "augment":
        lines += ["train:", f"  augment: *a{levels}"]
    return "\n".join(lines) + "\n"


CONFIGS: dict[str, tuple[bytes | str, tuple[str, ...]]] = {
    # name -> (file content, words of the error besides the file or field name)
    "epochs-string": ('train:\n  epochs: "two"\n', ("train.epochs", "'two'")),
    "key-twice": ("train:\n  epochs: 1\n  epochs: 50\n", ("'epochs'", "twice", "line 3")),
    "section-twice": ("train:\n  epochs: 1\ntrain:\n  lr: 0.1\n", ("'train'", "twice")),
    "epochs-null": ("train:\n  epochs: null\n", ("train.epochs",)),
    "epochs-inf": ("train:\n  epochs: .inf\n", ("train.epochs",)),
    "epochs-list": ("train:\n  epochs: [1, 2]\n", ("train.epochs",)),
    "seed-string": ('train:\n  seed: "abc"\n', ("train.seed", "'abc'")),
    "seed-huge": ("train:\n  seed: 99999999999999999999999\n", ("seed",)),
    "seed-negative": ("train:\n  seed: -1\n", ("seed",)),
    "lr-list": ("train:\n  lr: [1, 2]\n", ("train.lr",)),
    "data-dataset-number": ("data:\n  dataset: 12\n", ("data.dataset", "12")),
    "data-is-list": ("data: [digits]\n", ("data",)),
    "data-is-string": ("data: digits\n", ("data",)),
    "options-string": ('model:\n  options: "not a dict"\n', ("model.options",)),
    "options-list": ("model:\n  options: [1, 2]\n", ("model.options",)),
    "model-name-list": ("model:\n  name: [1]\n", ("model.name",)),
    "augment-number": ("train:\n  augment: 5\n", ("train.augment",)),
    "augment-bad-value": ('train:\n  augment: [hflip, "crop:abc"]\n', ("crop:abc",)),
    "augment-mapping": ("train:\n  augment: {hflip: 1}\n", ("train.augment",)),
    "cache-no-string": ('data:\n  cache: "no"\n', ("data.cache", "'no'")),
    "cache-number": ("data:\n  cache: 2\n", ("data.cache",)),
    "report-number": ("report: 1\n", ("report",)),
    "class-weights-mapping": ("train:\n  class_weights: {a: 1}\n", ("class_weights",)),
    "widths-string": ("model:\n  options:\n    widths: abc\n", ("widths",)),
    "unknown-top-level": ("foo: 1\n", ("'foo'",)),
    "unknown-train-field": ("train:\n  lr: 0.1\n  epoch: 3\n", ("train.epoch",)),
    "unknown-section-field": ("data:\n  datset: digits\n", ("data.datset",)),
    "top-level-list": ("- 1\n- 2\n", ("c.yaml", "mapping")),
    "top-level-number": ("42\n", ("c.yaml", "mapping")),
    "alias-bomb-augment": (alias_bomb(9), ("c.yaml", "aliases")),
    "alias-bomb-options": (alias_bomb(9, where="options"), ("c.yaml", "aliases")),
    "alias-small": ("train:\n  augment: &a [hflip]\nmodel:\n  options:\n    x: *a\n", ("c.yaml", "aliases")),
    "binary-elf": (b"\x7fELF\x02\x01\x01\x00\xd0\xff\xfe" + bytes(range(256)), ("c.yaml", "not text")),
    "latin-1-text": (b'data:\n  dataset: "caf\xe9"\n', ("c.yaml", "not text")),
    "nul-bytes": ("train:\n  epochs: 1\x00\x00\n", ("c.yaml",)),
    "python-tag": ('train: !!python/object/apply:os.system ["echo hi"]\n', ("c.yaml", "not valid YAML")),
    "unclosed-bracket": ("train: [1\n", ("c.yaml", "not valid YAML")),
    "tab-indent": ("train:\n\tepochs: 2\n", ("c.yaml", "not valid YAML")),
    "nested-lists-5000": ("[" * 5000 + "]" * 5000 + "\n", ("c.yaml",)),
    "name-1MB": ("name: " + "x" * 1_000_000 + "\n", ("name",)),
    "long-value-echo": ("train:\n  optimizer: " + "y" * 1_000_000 + "\n", ("optimizer",)),
}
CONFIG_RSS = {"alias-bomb-augment", "alias-bomb-options", "nested-lists-5000", "name-1MB", "long-value-echo"}


def config_cases(root: Path) -> list[Case]:
    cases = []
    for name, (content, words) in CONFIGS.items():
        d = root / name
        cases.append(Case(
            "config", name, ("train", "--config", str(d / "c.yaml"), "--out", str(d / "runs"), "--no-report"),
            code=2, expect=words, setup=_write(d / "c.yaml", content), check=_absent(d / "runs"),
            max_rss_mb=RSS_BOUND_MB if name in CONFIG_RSS else None))
    d = root / "folder-as-config"
    cases.append(Case("config", "folder-as-config", ("train", "--config", str(d / "c.yaml"), "--out", str(d / "runs")),
                      code=2, expect=("c.yaml",), setup=lambda: (d / "c.yaml").mkdir(parents=True, exist_ok=True),
                      check=_absent(d / "runs")))
    d = root / "missing"
    cases.append(Case("config", "missing-file", ("train", "--config", str(d / "none.yaml"), "--out", str(d / "runs")),
                      code=2, expect=("none.yaml", "does not exist"), check=_absent(d / "runs")))
    return cases




def cli_cases(root: Path, base: Path) -> list[Case]:
    def train(name: str, args: list[str], words: tuple[str, ...], xfail: str | None = None) -> Case:
        out = root / name / "runs"
        return Case("cli-args", name, ("train", "--out", str(out), "--epochs", "1", "--no-report", *args),
                    code=2, expect=words, check=_absent(out), xfail=xfail)

    def other(name: str, argv: list[str], words: tuple[str, ...], code: int = 2, xfail: str | None = None,
              check=None, setup=lambda: None) -> Case:
        return Case("cli-args", name, tuple(argv), code=code, expect=words, xfail=xfail, check=check, setup=setup)

    def pretrained(name: str, make: Callable[[Path], None] | None, words: tuple[str, ...], file: Path | None = None
                   ) -> Case:
        where = root / name
        file = file or where / "weights.safetensors"
        out = where / "runs"

        def setup() -> None:
            where.mkdir(parents=True, exist_ok=True)
            if make is not None and not file.exists():
                make(file)
        return Case("cli-args", name, ("train", "--out", str(out), "--epochs", "1", "--no-report", *SMALL,
                                       "--pretrained", str(file)), code=2, expect=(file.name, *words),
                    setup=setup, check=_absent(out))

    def base_tensors(edit: Callable[[dict], dict]) -> Callable[[Path], None]:
        def make(path: Path) -> None:
            tensors, _ = _read_st(base / "checkpoints" / "best.safetensors")  # the model's tensors under "model."
            plain = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            _write_st(path, edit(plain), {})
        return make

    def tune(name: str, args: list[str], words: tuple[str, ...]) -> Case:
        where = root / name  # nothing at all may appear here: the study folder, its database, or one above it
        return Case("cli-args", name, ("tune", "--out", str(where / "a" / "b" / "runs"), "--trials", "1",
                                       "--epochs", "1", *args), code=2, expect=words, check=_absent(where))

    d = root / "files"
    run = root / "run"  # a copy of the base run: a case that wrongly succeeds must not change the shared one
    nobest = root / "run-without-best"
    busy = _free_port()  # another program listens there while the case runs

    def copy_run() -> None:
        if not run.exists():
            shutil.copytree(base, run)

    cases = [
        train("model-option-widths-abc", ["--model-option", "widths=abc"], ("fastnet_small", "widths")),
        dataclasses.replace(train("model-option-widths-huge", ["--model-option", "widths=[100000,100000,100000]"],
                                  ("fastnet_small", "parameters", "GiB")), max_rss_mb=RSS_BOUND_MB),
        train("model-option-widths-negative", ["--model-option", "widths=[-8,8,8]"], ("widths",)),
        train("model-option-unknown", ["--model-option", "depth=3"], ("depth",)),
        train("model-option-no-equals", ["--model-option", "widths"], ("--model-option", "KEY=VALUE")),
        train("model-option-bad-yaml", ["--model-option", "widths=[8,8"], ("--model-option", "widths")),
        train("model-option-yaml-alias", ["--model-option", "x=*a"], ("--model-option",)),
        train("seed-negative", ["--seed", "-1"], ("seed", "-1")),
        train("seed-huge", ["--seed", str(2 ** 64)], ("seed",)),
        train("epochs-negative", ["--epochs", "-3"], ("epochs", "-3"), None),
        train("epochs-zero", ["--epochs", "0"], ("epochs",)),
        train("epochs-not-a-number", ["--epochs", "abc"], ("--epochs", "'abc'")),
        train("batch-size-zero", ["--batch-size", "0"], ("batch_size",)),
        train("batch-size-negative", ["--batch-size", "-1"], ("batch_size",)),
        train("lr-nan", ["--lr", "nan"], ("lr", "nan")),
        train("lr-inf", ["--lr", "inf"], ("lr",)),
        train("lr-negative", ["--lr", "-0.1"], ("lr",)),
        train("image-size-zero", ["--image-size", "0x0"], ("image_size",)),
        train("image-size-huge", ["--image-size", "100000"], ("image_size", "100000")),
        train("image-size-words", ["--image-size", "big"], ("image_size", "big")),
        train("augment-unknown", ["--augment", "mixup"], ("mixup",)),
        train("augment-crop-huge", ["--augment", "crop:99"], ("crop",)),
        train("class-weights-words", ["--class-weights", "a,b"], ("class_weights",)),
        train("val-fraction-over-1", ["--val-fraction", "1.5"], ("val_fraction",)),
        train("label-smoothing-1", ["--label-smoothing", "1"], ("label_smoothing",)),
        train("name-parent", ["--name", "../../x"], ("'../../x'",)),
        train("name-dot-dot", ["--name", ".."], ("'..'",)),
        train("name-slash", ["--name", "a/b"], ("'a/b'",)),
        train("name-absolute", ["--name", "/tmp/x"], ("'/tmp/x'",)),
        train("name-300-chars", ["--name", "n" * 300], ("name",)),
        train("data-missing", ["--data", str(root / "no-such-folder")], ("no-such-folder",)),
        train("data-path-too-long", ["--data", str(root / ("d" * 5000))], ("ddd",)),
        other("predict-input-path-too-long", ["predict", str(base), str(root / ("p" * 5000 + ".png"))], ("ppp",)),
        other("evaluate-run-path-too-long", ["evaluate", str(root / ("r" * 5000))], ("rrr",)),
        train("optimizer-100k-chars", ["--optimizer", "o" * 100_000], ("--optimizer",)),
        train("model-unknown", ["--model", "vgg99"], ("vgg99",)),
        Case("cli-args", "out-is-a-file", ("train", "--out", str(d / "out.txt"), "--epochs", "1", "--no-report"),
             code=2, expect=("out.txt",), setup=_write(d / "out.txt", "a file, not a folder\n"),
             check=lambda: None if (d / "out.txt").read_text() == "a file, not a folder\n" else "out.txt changed"),
        train("nproc-more-than-cores", ["--nproc", "64"], ("--nproc 64", "cores", "--force")),
        pretrained("pretrained-all-nan", base_tensors(lambda t: {k: v * float("nan") if v.is_floating_point() else v
                                                                 for k, v in t.items()}), ("NaN",)),
        pretrained("pretrained-integers", base_tensors(lambda t: {k: v.to(dtype=__import__("torch").int32)
                                                                  for k, v in t.items()}), ("whole numbers",)),
        pretrained("pretrained-three-tensors", base_tensors(lambda t: dict(sorted(t.items())[:3])),
                   ("fit only 3",)),
        pretrained("pretrained-is-a-folder", lambda p: p.mkdir(), ("is a folder",)),
        pretrained("pretrained-is-a-fifo", lambda p: os.mkfifo(p), ("not a regular file",),
                   file=root / "pretrained-is-a-fifo" / "weights.pt"),
        pretrained("pretrained-dev-zero", None, ("not a regular file",), file=Path("/dev/zero")),
        train("rdzv-timeout-nan", ["--rdzv-timeout", "nan"], ("--rdzv-timeout", "nan")),
        train("rdzv-endpoint-without-nproc", ["--rdzv-endpoint", "127.0.0.1:29400"], ("--rdzv-endpoint", "--nproc")),
        dataclasses.replace(train("mlflow-uri-with-password", ["--track", "mlflow", "--mlflow-uri",
                                                               "http://me:s3cr3t-pw@127.0.0.1:1"],
                                  ("mlflow_uri", "MLFLOW_TRACKING_PASSWORD")), secrets=("s3cr3t-pw",)),
        dataclasses.replace(train("mlflow-uri-with-token", ["--track", "mlflow", "--mlflow-uri",
                                                            "http://127.0.0.1:1/?token=t0ken-xyz"],
                                  ("mlflow_uri",)), secrets=("t0ken-xyz",)),
        train("mlflow-uri-not-a-store", ["--track", "mlflow", "--mlflow-uri", "garbage-uri"],
              ("mlflow_uri", "garbage-uri", "cannot be used")),
        train("mlflow-uri-file-store", ["--track", "mlflow", "--mlflow-uri", f"file://{root}/mlruns"],
              ("mlflow_uri", "cannot be used")),
        train("mlflow-uri-unreachable", ["--track", "mlflow", "--mlflow-uri", "http://127.0.0.1:1"],
              ("mlflow_uri", "did not answer within", "IMGCLS_TRACKER_TIMEOUT")),
        tune("study-percent-encoded-parent", ["--study", "%2e%2e%2f%2e%2e%2fx"], ("--study", "%2e%2e")),
        tune("study-with-url-query", ["--study", "x?mode=ro"], ("--study", "x?mode=ro")),
        tune("study-empty", ["--study", ""], ("--study", "''")),
        tune("study-with-space", ["--study", "a b"], ("--study", "'a b'")),
        dataclasses.replace(tune("every-trial-fails", ["--space", str(d / "huge-batches.yaml"), *SMALL],
                                 ("no trial", "1 failed", "batch_size", "study.json")),
                            code=1, check=None, setup=_write(d / "huge-batches.yaml", "batch_size: [100000, 200000]\n")),
        dataclasses.replace(tune("grid-tiny-step", ["--sampler", "grid", "--space", str(d / "tiny-step.yaml")],
                                 ("grid", "combinations", "lr")),
                            setup=_write(d / "tiny-step.yaml", "lr: {low: 0.001, high: 0.1, step: 1.0e-12}\n"),
                            max_rss_mb=RSS_BOUND_MB),
        dataclasses.replace(tune("space-5000-choices", ["--space", str(d / "many-choices.yaml")],
                                 ("lr", "5,000 choices", "range")),
                            setup=_write(d / "many-choices.yaml",
                                         "lr: [" + ", ".join(f"{1e-4 + i * 1e-6:.6f}" for i in range(5000)) + "]\n")),
        dataclasses.replace(tune("grid-seed-4e9", ["--sampler", "grid", "--space", str(d / "seeds.yaml")],
                                 ("grid", "combinations", "seed")),
                            setup=_write(d / "seeds.yaml", "seed: {low: 0, high: 4000000000}\n"),
                            max_rss_mb=RSS_BOUND_MB),
        tune("storage-port-not-a-number", ["--storage", "postgresql://me@127.0.0.1:notaport/db"],
             ("--storage", "notaport", "port")),
        dataclasses.replace(tune("storage-password-in-query", [
            "--storage", "postgresql+psycopg://me@127.0.0.1:1/db?password=hunt3r2-pw&connect_timeout=2"],
            ("--storage", "password=***")), secrets=("hunt3r2-pw",)),
        dataclasses.replace(tune("storage-password-in-userinfo", [
            "--storage", "postgresql+psycopg://me:hunt3r2-pw@127.0.0.1:1/db?connect_timeout=2"],
            ("--storage", "me:***@")), secrets=("hunt3r2-pw",)),
        Case("run-folder", "out-name-is-a-plain-folder-with-run-files",
             ("train", "--out", str(d / "plain"), "--name", "x", "--epochs", "1", "--no-report", "--quiet", *SMALL),
             code=0, setup=_plain_folder_like_a_run(d / "plain" / "x"),
             check=_untouched_and_beside(d / "plain" / "x", d / "plain" / "x-2")),
        other("predict-checkpoint-best-missing", ["predict", str(nobest), str(d / "x.png"), "--checkpoint", "best"],
              ("best.safetensors", "--checkpoint last"), setup=_copy_without(base, nobest, "checkpoints/best.safetensors",
                                                                             d / "x.png")),
        dataclasses.replace(other("serve-port-in-use", ["serve", str(base), "--port", str(busy)],
                                  (f"127.0.0.1:{busy}", "in use", "--port")), hold=lambda: port_in_use(busy)),
        other("serve-port-99999", ["serve", str(base), "--port", "99999"], ("--port", "99999")),
        other("serve-port-negative", ["serve", str(base), "--port", "-1"], ("--port", "-1")),
        other("serve-max-batch-zero", ["serve", str(base), "--max-batch", "0", "--port", "0"], ("--max-batch",)),
        other("serve-request-cap-zero", ["serve", str(base), "--max-request-bytes", "0", "--port", "0"],
              ("max_request_bytes",)),
        other("serve-client-timeout-nan", ["serve", str(base), "--client-timeout", "nan", "--port", "0"],
              ("client_timeout",)),
        other("serve-key-file-missing", ["serve", str(base), "--api-key-file", str(d / "none.txt")],
              ("none.txt",)),
        other("serve-key-file-empty", ["serve", str(base), "--api-key-file", str(d / "empty.txt")],
              ("empty.txt",), setup=_write(d / "empty.txt", "")),
        other("serve-key-file-binary", ["serve", str(base), "--api-key-file", str(d / "key.bin")],
              ("key.bin",), setup=_write(d / "key.bin", b"\xff\xfe\x00key")),
        other("serve-missing-run", ["serve", str(root / "no-run")], ("no-run",)),
        other("serve-onnx-without-export", ["serve", str(base), "--runtime", "onnx", "--port", "0"], ("model.onnx",)),
        other("predict-top-k-zero", ["predict", str(base), str(d / "x.png"), "--top-k", "0"], ("--top-k",),
              setup=_write(d / "x.png", png_bytes(side=8, channels=1))),
        other("predict-missing-input", ["predict", str(base), str(d / "nothing.png")], ("nothing.png",)),
        other("predict-thresholds-absent", ["predict", str(base), str(d / "x.png"), "--thresholds"],
              ("thresholds",), setup=_write(d / "x.png", png_bytes(side=8, channels=1))),
        other("evaluate-top-k-negative", ["evaluate", str(run), "--top-k", "-1"], ("--top-k",), setup=copy_run,
              check=_same_as(run / "eval_test.json", base / "eval_test.json")),
        other("evaluate-top-k-zero", ["evaluate", str(run), "--top-k", "0"], ("--top-k",), setup=copy_run,
              check=_same_as(run / "eval_test.json", base / "eval_test.json")),
        other("evaluate-split-unknown", ["evaluate", str(base), "--split", "nosuch"], ("nosuch",)),
        other("evaluate-missing-run", ["evaluate", str(root / "no-run")], ("no-run",)),
        other("export-tolerance-nan", ["export", str(base), "--tolerance", "nan", "--out", str(d / "e1" / "m.onnx")],
              ("tolerance",), check=_absent(d / "e1")),
        other("export-tolerance-negative", ["export", str(base), "--tolerance", "-1", "--out",
                                            str(d / "e2" / "m.onnx")], ("tolerance",), check=_absent(d / "e2")),
        other("models-unknown", ["models", "vgg99"], ("vgg99",)),
        other("models-input-zero", ["models", "fastnet_small", "--input", "3x0x0"], ("image_size",)),
        other("models-input-words", ["models", "fastnet_small", "--input", "big"], ("--input", "big")),
        other("models-input-huge", ["models", "fastnet_small", "--input", "3x100000x100000"], ("image_size",)),
        other("thresholds-objective-bad", ["thresholds", str(base), "--objective", "precision=2"], ("precision=2",)),
        other("cv-folds-one", ["cv", "--folds", "1", "--epochs", "1"], ("folds",)),
        other("cv-folds-huge", ["cv", "--folds", "100000", "--epochs", "1"], ("folds", "100000")),
        other("compare-missing-run", ["compare", str(root / "no-run"), "--out", str(d / "cmp")], ("no-run",),
              check=_absent(d / "cmp")),
        other("explain-method-unknown", ["explain", str(base), str(d / "x.png"), "--method", "magic", "--out",
                                         str(d / "ex")], ("magic",), setup=_write(d / "x.png", png_bytes(8, channels=1)),
              check=_absent(d / "ex")),
        other("explain-target-unknown", ["explain", str(base), str(d / "x.png"), "--target", "zebra", "--out",
                                         str(d / "ex2")], ("zebra",), setup=_write(d / "x.png", png_bytes(8, channels=1)),
              check=_absent(d / "ex2")),
    ]
    return cases


def checkpoint_cases(root: Path, base: Path) -> list[Case]:
    def setup_for(dest: Path, damage) -> Callable[[], None]:
        def setup() -> None:
            damaged_run(base, dest / "run", damage)
            _write(dest / "digit.png", png_bytes(side=8, channels=1))()
        return setup

    cases = []
    for damage_name, damage in CHECKPOINT_DAMAGE.items():
        for command, argv in CHECKPOINT_COMMANDS.items():
            if command in damage.skip:
                continue
            d = root / f"{damage_name}-{command}"
            run = d / "run"
            cases.append(Case(
                "checkpoint", f"{damage_name}/{command}", tuple(argv(run, d)), code=2,
                expect=(f"{damage_name}-{command}", *(damage.words_for or {}).get(command, damage.words)),
                setup=setup_for(d, damage.fn), watch=(run,),
                # a refused resume keeps config.yaml as it was, but may log to train.log
                unwatched=(".lock", "train.log") if command == "resume" else (".lock",),
                check=_absent(d / "export"), xfail=(damage.bugs or {}).get(command)))
    return cases


def _bad_listed(run: Path, members: dict[str, str]) -> Callable[[], str | None]:
    """dataset.json of ``run`` lists each member (path ending) as a bad file whose reason holds the words."""
    def check() -> str | None:
        info = run / "dataset.json"
        if not info.is_file() or not (run / "run.json").is_file():
            return f"{run.name} has no dataset.json or run.json: the run did not finish"
        bad = json.loads(info.read_text()).get("bad", [])
        for member, words in members.items():
            if not any(b["path"].endswith(member) and words in b["reason"] for b in bad):
                return f"dataset.json does not list {member} as a bad file ({words!r}): {str(bad)[:300]}"
        return None
    return check


def _train_args(data: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("train", "--data", str(data), "--epochs", "1", "--batch-size", "8", "--out", str(out), "--name", "r",
            "--no-report", "--quiet", *SMALL, *extra)


@functools.cache
def _bomb_zip(path: Path) -> Path:
    """photos.zip: two classes of 16 images and dark/bomb.png, 1 GiB of zeros (about 1 MB in the zip)."""
    if not path.exists():
        write_zip(path, image_members() + [ZipMember.zeros("dark/bomb.png", 1 << 30)])
    return path


def zip_cases(root: Path, base: Path) -> list[Case]:
    cases: list[Case] = []
    shared = root / "shared"

    def zip_case(name: str, members_fn, code: int, words: tuple[str, ...] = (), bad: dict[str, str] | None = None,
                 command: str = "train", max_rss: float | None = None, xfail: str | None = None,
                 avoid: tuple[str, ...] = (), writer=None, lists_files: bool = False, **zip_options) -> Case:
        d = root / name
        archive = d / f"{name}.zip"

        def setup() -> None:
            if not archive.exists():
                if writer is not None:
                    writer(archive)
                else:
                    write_zip(archive, members_fn(), **zip_options)

        out = d / "runs"
        if command == "train":
            argv = _train_args(archive, out)
            check = _bad_listed(out / "r", bad) if code == 0 else _absent(out)
        else:
            argv = ("predict", str(base), str(archive))
            check = None
        expect = (f"{name}.zip", *words) if code else ()  # a run that succeeds lists its bad files in dataset.json
        return Case("data-zip", f"{name}/{command}", argv, code=code, expect=expect, avoid=avoid, setup=setup,
                    check=check, max_rss_mb=max_rss, lists_files=lists_files, xfail=xfail)

    def garbage(i: int) -> bytes:
        return bytes((j * 31 + i * 17) % 256 for j in range(300))

    bomb = shared / "photos-bomb.zip"
    out = root / "bomb-train" / "runs"
    cases.append(Case("data-zip", "bomb-1GiB-member/train", _train_args(bomb, out, "--no-cache"), code=0,
                      setup=lambda: _bomb_zip(bomb), check=_bad_listed(out / "r", {"dark/bomb.png": "over the limit"}),
                      max_rss_mb=RSS_BOUND_MB))
    cases.append(Case("data-zip", "bomb-1GiB-member/predict", ("predict", str(base), str(bomb)), code=1,
                      expect=("photos-bomb.zip", "bomb.png", "over the limit"), setup=lambda: _bomb_zip(bomb),
                      max_rss_mb=RSS_BOUND_MB))
    liar = {"dark/liar.png": 5000}  # declares 5,000 bytes, inflates to 1 GiB
    cases += [
        zip_case("size-lie", lambda: image_members() + [ZipMember.zeros("dark/liar.png", 1 << 30)], 0,
                 bad={"dark/liar.png": "damaged"}, declared=liar, max_rss=RSS_BOUND_MB),
        zip_case("size-lie", lambda: image_members() + [ZipMember.zeros("dark/liar.png", 1 << 30)], 1,
                 ("liar.png", "damaged"), command="predict", declared=liar, max_rss=RSS_BOUND_MB),
        zip_case("truncated", None, 2, avoid=("not a folder or a zip file",),
                 writer=lambda p: _truncated(write_zip(p, image_members()), 0.6)),
        zip_case("truncated", None, 2, command="predict", avoid=("not a folder or a zip file",),
                 writer=lambda p: _truncated(write_zip(p, image_members()), 0.6)),
        zip_case("garbage-member", lambda: image_members() + [ZipMember.of("light/garbage.png", garbage(0))], 0,
                 bad={"light/garbage.png": "not a recognised image"}),
        zip_case("garbage-member", lambda: image_members() + [ZipMember.of("light/garbage.png", garbage(0))], 1,
                 ("garbage.png",), command="predict"),
        zip_case("many-bad-members", lambda: image_members() + [ZipMember.of(f"dark/bad{i}.png", garbage(i))
                                                                  for i in range(60)], 0,
                 bad={f"dark/bad{i}.png": "" for i in range(60)}),
        zip_case("all-members-bad", lambda: [ZipMember.of(f"{c}/{i}.png", garbage(i)) for c in ("a", "b")
                                             for i in range(10)], 2, lists_files=True),
        zip_case("empty", list, 2),
        zip_case("encrypted-member", lambda: image_members() + [_with_flags(ZipMember.of("dark/locked.png",
                                                                                           png_bytes()), 0x1)], 0,
                 bad={"dark/locked.png": ""}),
        zip_case("unknown-method", lambda: image_members() + [_with_method(ZipMember.of("dark/odd.png",
                                                                                         png_bytes()), 99)], 0,
                 bad={"dark/odd.png": ""}),
        zip_case("crc-mismatch", lambda: image_members() + [_with_crc(ZipMember.of("dark/crc.png", png_bytes()))], 0,
                 bad={"dark/crc.png": "damaged"}),
        zip_case("crc-mismatch", lambda: image_members() + [_with_crc(ZipMember.of("dark/crc.png", png_bytes()))], 1,
                 ("crc.png", "damaged"), command="predict"),
        zip_case("bad-central-directory", image_members, 2, cd_offset_shift=7, lists_files=True),
        zip_case("not-a-zip", None, 2, ("not a folder or a zip file",),
                 writer=lambda p: _write(p, bytes(range(256)) * 40)()),
        zip_case("traversal-names", lambda: image_members() + [ZipMember.of("../../escaped/evil.png", png_bytes()),
                                                               ZipMember.of("/abs/evil.png", png_bytes())], 0,
                 bad={}),
    ]
    # Member names that climb out: the zip is read in place, so nothing may appear outside the run's folders.
    cases[-1] = dataclasses.replace(cases[-1], check=_and(cases[-1].check, _absent(
        root / "escaped", root.parent / "escaped", Path("/abs/evil.png"))))
    return cases


def _and(*checks) -> Callable[[], str | None]:
    def check() -> str | None:
        return next((found for c in checks if c is not None and (found := c())), None)
    return check


def _truncated(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def _with_flags(m: ZipMember, flags: int) -> ZipMember:
    m.flags |= flags
    return m


def _with_method(m: ZipMember, method: int) -> ZipMember:
    m.method = method
    return m


def _with_crc(m: ZipMember) -> ZipMember:
    m.crc ^= 0xDEADBEEF
    return m


def _files(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        _write(root / rel, content)()


def _non_utf8_folder(root: Path) -> Callable[[], None]:
    """Two classes, one whose folder name is not UTF-8, with file names that are not UTF-8 either."""
    def setup() -> None:
        raw = os.fsencode(root)
        if os.path.isdir(raw):
            return
        try:
            for cls, base in ((b"dark", 40), (b"li\xffght", 200)):
                os.makedirs(os.path.join(raw, cls))
                for i in range(16):
                    name = f"img{i}".encode() + (b"\xfe\x80" if i % 4 == 0 else b"") + b".png"
                    with open(os.path.join(raw, cls, name), "wb") as fh:
                        fh.write(png_bytes(base=base, seed=i))
        except OSError as exc:
            shutil.rmtree(raw, ignore_errors=True)
            raise CaseUnsupported(f"this file system refuses names that are not UTF-8 ({exc})") from None
    return setup


def _run_finished(run: Path, *files: str, contains: dict[str, str] | None = None) -> Callable[[], str | None]:
    def check() -> str | None:
        missing = [f for f in ("run.json", *files) if not (run / f).is_file()]
        if missing:
            return f"{run} lacks {missing}: the run did not finish"
        for f, words in (contains or {}).items():
            if words not in (run / f).read_text():
                return f"{run / f} does not hold {words!r}"
        return None
    return check



def folder_cases(root: Path, base: Path) -> list[Case]:
    cases = []
    for variant, extra in (("cache", ()), ("no-cache", ("--no-cache",))):
        d = root / f"non-utf8-names-{variant}"
        out = d / "runs"
        cases.append(Case("data-folder", f"non-utf8-names/{variant}", _train_args(d / "photos", out, *extra), code=0,
                          setup=_non_utf8_folder(d / "photos"),
                          check=_run_finished(out / "r", "eval_test.csv", "dataset.json",
                                              contains={"eval_test.csv": "li\\xffght"})))

    def folder(name: str, make: Callable[[Path], None], code: int, words: tuple[str, ...] = (),
               bad: dict[str, str] | None = None, command: str = "train", max_rss: float | None = None,
               xfail: str | None = None, lists_files: bool = False) -> Case:
        d = root / name
        photos = d / "photos"

        def setup() -> None:
            if not photos.exists():
                photos.mkdir(parents=True)
                make(photos)

        out = d / "runs"
        if command == "train":
            argv = _train_args(photos, out)
            check = _bad_listed(out / "r", bad) if code == 0 else _absent(out)
        else:
            argv = ("predict", str(base), str(photos))
            check = None
        return Case("data-folder", f"{name}/{command}", argv, code=code, expect=("photos", *words) if code else (),
                    setup=setup, check=check, max_rss_mb=max_rss, lists_files=lists_files, xfail=xfail)

    def with_bad_files(p: Path) -> None:
        write_class_folders(p)
        (p / "dark" / "empty.png").write_bytes(b"")
        (p / "dark" / "text.jpg").write_text("not a picture\n")
        (p / "light" / "cut.png").write_bytes(png_bytes(base=200)[:60])
        (p / "light" / "header-only.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(40))

    def with_pixel_bomb(p: Path) -> None:
        write_class_folders(p)
        (p / "dark" / "huge.png").write_bytes(png_pixel_bomb())

    def with_header_bomb(p: Path) -> None:  # over twice PIL's limit: Image.open itself raises
        write_class_folders(p)
        (p / "dark" / "declared-huge.png").write_bytes(png_header_only(30_000, 30_000))

    def ansi_name(p: Path) -> None:  # a name that would clear the screen and turn the text red
        write_class_folders(p)
        (p / "dark" / "\x1b[2J\x1b[31mfake.png").write_bytes(b"not an image")

    def weird_names(p: Path) -> None:
        write_class_folders(p, classes={"<b onmouseover=alert(1)>": 40, "new\nline": 200})

    cases += [
        folder("bad-files", with_bad_files, 0, bad={"empty.png": "", "text.jpg": "", "cut.png": "",
                                                     "header-only.jpg": ""}),
        folder("bad-files", with_bad_files, 1, ("header-only.jpg",), command="predict"),
        folder("pixel-bomb", with_pixel_bomb, 0, bad={"huge.png": "more than the limit"}, max_rss=RSS_BOUND_MB),
        folder("pixel-bomb", with_pixel_bomb, 1, ("huge.png", "more than the limit"), command="predict",
               max_rss=RSS_BOUND_MB),
        folder("header-bomb", with_header_bomb, 0, bad={"declared-huge.png": "decompression bomb"}),
        folder("header-bomb", with_header_bomb, 1, ("declared-huge.png", "decompression bomb"), command="predict"),
        folder("ansi-escape-name", ansi_name, 1, ("fake.png", "\\x1b[2J"), command="predict"),
        folder("empty", lambda p: None, 2),
        folder("one-class", lambda p: write_class_folders(p, classes={"only": 90}), 2),
        folder("no-images", lambda p: _files(p, {f"{c}/notes.txt": b"hi" for c in "ab"}), 2),
        folder("only-bad-images", lambda p: _files(p, {f"{c}/{i}.png": b"x" * i for c in "ab" for i in range(8)}), 2,
               lists_files=True),
        folder("html-and-newline-classes", weird_names, 0, bad={}),
        # Links: one out of the folder pulls in files from elsewhere; one to a sibling would read its images twice.
        folder("class-linked-outside", link_outside, 2, ("system ->", "--follow-links")),
        folder("class-linked-to-sibling", link_sibling, 2, ("dark2/ is a link to dark/",)),
        folder("file-linked-inside", link_file_inside, 0, bad={}),
    ]
    return cases


def link_outside(p: Path) -> None:
    write_class_folders(p)
    elsewhere = p.parent / "elsewhere"
    write_class_folders(elsewhere, classes={"icons": 40})
    (p / "system").symlink_to(elsewhere / "icons", target_is_directory=True)


def link_sibling(p: Path) -> None:
    write_class_folders(p)
    (p / "dark2").symlink_to(p / "dark", target_is_directory=True)


def link_file_inside(p: Path) -> None:
    write_class_folders(p)
    first = sorted((p / "dark").iterdir())[0]
    (p / "light" / "also-dark.png").symlink_to(first)  # skipped with its reason: read once, as dark


@contextlib.contextmanager
def port_in_use(port: int) -> Iterator[None]:
    """Another program listening on 127.0.0.1:``port``."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def locked_by_this_process(run: Path) -> Iterator[None]:
    """Hold ``run``'s write lock as a training imgcls does (flock on .lock, our PID in it)."""
    import fcntl

    with open(run / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


def run_folder_cases(root: Path, base: Path) -> list[Case]:
    def run_case(name: str, spoil: Callable[[Path], None] | None, argv: Callable[[Path], list[str]],
                 words: tuple[str, ...], named: bool = True, hold=None, xfail: str | None = None) -> Case:
        """``named``: the error names the run folder (else ``words`` name the input: a flag, a field)."""
        d = root / name
        run = d / "run"

        def setup() -> None:
            if not run.exists():
                shutil.copytree(base, run)
                if spoil is not None:
                    spoil(run)

        return Case("run-folder", name, tuple(argv(run)), code=2, expect=(name, *words) if named else words,
                    setup=setup, watch=(run,), hold=(lambda: hold(run)) if hold else None, xfail=xfail)

    def resume(run: Path) -> list[str]:
        return ["train", "--resume", str(run), "--epochs", "3", "--quiet"]

    def evaluate(run: Path) -> list[str]:
        return ["evaluate", str(run)]

    def report(run: Path) -> list[str]:
        return ["report", str(run)]

    def write(rel: str, content: bytes | str) -> Callable[[Path], None]:
        return lambda run: _write(run / rel, content)()

    def remove(rel: str) -> Callable[[Path], None]:
        def spoil(run: Path) -> None:
            p = run / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return spoil

    def folder_at(rel: str) -> Callable[[Path], None]:
        def spoil(run: Path) -> None:
            remove(rel)(run)
            (run / rel).mkdir()
        return spoil

    def tensorboard_file(run: Path) -> None:  # a run that tracks to TensorBoard, its folder a file
        text = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(text.replace("track: []", "track:\n- tensorboard"))
        (run / "tensorboard").write_text("not a folder\n")

    def decoy_outside(run: Path) -> None:  # a checkpoint beside the run, and run.json pointing at it
        (run.parent / "decoy").mkdir()
        shutil.copy(run / "checkpoints" / "best.safetensors", run.parent / "decoy" / "best.safetensors")
        write("run.json", '{"final_checkpoint": "../../decoy/best"}')(run)

    return [
        run_case("locked-by-another-process", None, resume, ("in use by another imgcls process",
                                                              f"PID {os.getpid()}"), hold=locked_by_this_process),
        run_case("resume-changes-lr", None, lambda r: [*resume(r), "--lr", "0.5"],
                 ("only --epochs may change", "lr"), named=False),
        run_case("resume-changes-model", None, lambda r: [*resume(r), "--model", "resnet20"],
                 ("only --epochs may change", "model"), named=False),
        run_case("resume-with-config", None, lambda r: [*resume(r), "--config", str(r / "config.yaml")],
                 ("--config",), named=False),
        run_case("no-config-yaml", remove("config.yaml"), resume, ("no config.yaml",)),
        run_case("no-last-checkpoint", remove("checkpoints/last.safetensors"), resume, ("last.safetensors",)),
        run_case("last-checkpoint-is-a-folder", folder_at("checkpoints/last.safetensors"), resume,
                 ("last.safetensors",)),
        run_case("no-checkpoints", remove("checkpoints"), evaluate, ("holds no checkpoint",)),
        run_case("config-yaml-binary", write("config.yaml", b"\x00\xff\xfe" * 50), resume, ("config.yaml",)),
        run_case("config-yaml-alias-bomb", write("config.yaml", alias_bomb(9)), resume, ("config.yaml", "aliases")),
        run_case("config-yaml-wrong-type", write("config.yaml", 'train:\n  epochs: "two"\n'), resume,
                 ("train.epochs",), named=False),
        run_case("lock-file-is-a-folder", folder_at(".lock"), resume, (".lock",)),
        run_case("metrics-jsonl-garbage", write("metrics.jsonl", b"\x00garbage{\n[1,2\n"), resume,
                 ("metrics.jsonl",)),
        run_case("run-json-garbage", write("run.json", "{not json"), evaluate, ("run.json",)),
        run_case("run-json-list", write("run.json", "[1, 2]"), evaluate, ("run.json",)),
        run_case("run-json-points-outside", decoy_outside, evaluate, ("final_checkpoint",)),
        run_case("tensorboard-is-a-file", tensorboard_file, resume, ("tensorboard", "is a file")),
        run_case("eval-test-json-garbage", write("eval_test.json", "{not json"), report, ("eval_test.json",
                                                                                           "imgcls evaluate")),
        run_case("eval-test-json-list", write("eval_test.json", "[1, 2]"), report, ("eval_test.json", "list")),
        run_case("calibration-json-garbage", write("calibration.json", "{not json"), report,
                 ("calibration.json", "imgcls calibrate")),
        run_case("thresholds-json-a-string", write("thresholds.json", '"f1"'), report,
                 ("thresholds.json", "imgcls thresholds")),
        run_case("refused-resume-keeps-config", lambda r: flip_bytes("middle")(r / "checkpoints" / "last.safetensors"),
                 resume, ("is damaged",)),
        Case("run-folder", "missing-run", ("train", "--resume", str(root / "no-such-run"), "--epochs", "3"), code=2,
             expect=("no-such-run",), check=_absent(root / "no-such-run")),
    ]
