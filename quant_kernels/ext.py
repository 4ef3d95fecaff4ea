"""The one native extension (quant_kernels/csrc), built lazily with ninja on first use.

Importing ``exl2`` never compiles.  The first call of :func:`get` (made by a front door in ``ops.py``)
builds the extension with ``torch.utils.cpp_extension.load`` into a cache folder keyed by the torch
version, the compiler, the CPU and a hash of the sources, so later processes load it in well under a
second.  CPU sources (C++, OpenMP) always build; CUDA sources build only when torch has CUDA and a
device is present.  If the build fails, one line says why and the pure-torch reference path is used.

Environment:

``EXL2_NO_EXT=1``      never build or load; every op runs its torch reference.
``EXL2_EXT_DIR``       cache root (default ``~/.cache/exl2/ext``); the build lives in ``<root>/<key>``.
``EXL2_CUDA_ARCHS``    CUDA architectures, e.g. ``"80;90"`` (default: torch's choice for the device).
``EXL2_EXT_VERBOSE=1`` show the compiler's output.

The first CPU build takes about 30 s on two cores (10 translation units, built in parallel by ninja).

Processes that start at the same time (Ray workers, parallel test runs) take turns on a build folder
through ``<build>/exl2-build.lock``, an ``flock`` the kernel drops when its holder exits however it exits,
so a killed build cannot leave it behind.  torch's own lock (``<build>/lock``) is only a file, and a build
killed inside ``cpp_extension.load`` leaves it, after which torch waits for it forever without a word; the
holder of our lock deletes a leftover one.  A process that has to wait says on stderr which process it
waits for, and again every ``WAIT_REPORT_S`` seconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time

import torch

from .qparams import VALID_BITS

try:
    import fcntl
except ImportError:          # not POSIX: no inter-process lock, torch's alone
    fcntl = None

log = logging.getLogger("exl2.quant_kernels.ext")

CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ["bind.cpp", "cpu/layer_cpu.cpp", "cpu/gptq_cpu.cpp", "cpu/kv_cpu.cpp"] + [f"cpu/bits_{b}.cpp" for b in VALID_BITS]
CUDA_SOURCES = ["bind_cuda.cpp", "cuda/gptq.cu", "cuda/kv.cu"] + [f"cuda/bits_{b}.cu" for b in VALID_BITS]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
CUDA_FLAGS = ["-O3", "-std=c++17"]

LOCK_NAME = "exl2-build.lock"     # our lock, in the build folder
TORCH_LOCK_NAME = "lock"          # torch.utils.cpp_extension's (torch.utils.file_baton.FileBaton)
WAIT_FIRST_REPORT_S = 2.0         # a short wait (another process loading a finished build) says nothing
WAIT_REPORT_S = 30.0

_lock = threading.Lock()
_module = None
_failed: str | None = None     # reason the build failed (then it is not retried in this process)


def disabled() -> bool:
    """True when ``EXL2_NO_EXT`` asks for the reference path."""
    return os.environ.get("EXL2_NO_EXT", "").strip() not in ("", "0")


def want_cuda() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available()


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0] if out else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") or line.startswith("flags"):
                return line          # -march=native: a different CPU must not reuse the build
    except OSError:
        pass
    return platform.processor()


def _torch_arch(a: str) -> str:
    """EXL2_CUDA_ARCHS spelling ("80", "90a") to TORCH_CUDA_ARCH_LIST's ("8.0", "9.0a")."""
    m = re.fullmatch(r"(\d+)(\d)([a-z]?)", a)
    if not m:
        raise ValueError(f"EXL2_CUDA_ARCHS: {a!r} is not an architecture like 80 or 90a")
    return f"{m.group(1)}.{m.group(2)}{m.group(3)}"


def sources(cuda: bool) -> list[pathlib.Path]:
    names = CPU_SOURCES + (CUDA_SOURCES if cuda else [])
    return [CSRC / n for n in names]


def cache_key(cuda: bool) -> str:
    """Hash of torch version, Python, compiler, CPU, CUDA settings and every file under csrc/."""
    h = hashlib.sha256()
    for part in (torch.__version__, sys.version, _compiler(), _cpu_model(), str(cuda),
                 os.environ.get("EXL2_CUDA_ARCHS", ""), " ".join(CFLAGS + CUDA_FLAGS)):
        h.update(part.encode())
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and p.suffix in (".h", ".cuh", ".cpp", ".cu"):
            h.update(str(p.relative_to(CSRC)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_dir(cuda: bool) -> pathlib.Path:
    root = os.environ.get("EXL2_EXT_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "exl2", "ext")
    return pathlib.Path(root) / cache_key(cuda)


def _say(msg: str) -> None:
    log.info(msg)
    print(msg, file=sys.stderr, flush=True)


def _owner(fd: int) -> str:
    """Who holds (or last held) the lock, as its holder wrote it: "process PID on HOST"."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if len(text) >= 2 and text[0].isdigit():
        return f"process {text[0]} on {text[1]}"
    return "another process"


@contextlib.contextmanager
def build_lock(bdir: pathlib.Path):
    """Exclusive use of the build folder BDIR by this process, for building and loading the extension.

    Waits (saying so) while another process holds it.  Once held, no other process of ours is inside
    torch's ``cpp_extension.load`` for this folder, so a torch lock file found there was left by a killed
    build and is removed.
    """
    fd = None
    try:
        if fcntl is not None:
            try:
                fd = os.open(bdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
                _acquire(fd, bdir)
            except OSError as e:   # read-only folder, a file system without flock: torch's lock alone
                log.warning("exl2: no build lock in %s (%s)", bdir, e)
                if fd is not None:
                    os.close(fd)
                    fd = None
        if fd is not None:
            last = _owner(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {platform.node() or '?'}\n".encode(), 0)
            stale = bdir / TORCH_LOCK_NAME
            if stale.exists():
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
                _say(f"exl2: removed {stale}, a lock left by an interrupted build of the native kernels "
                     f"(the last process to use this folder: {last})")
        yield
    finally:
        if fd is not None:
            os.close(fd)           # releases the flock


def _acquire(fd: int, bdir: pathlib.Path) -> None:
    """flock(LOCK_EX) on fd, polling, with a line on stderr after WAIT_FIRST_REPORT_S and every WAIT_REPORT_S."""
    t0 = time.monotonic()
    report_at = WAIT_FIRST_REPORT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - t0
        if waited >= report_at:
            _say(f"exl2: waiting for {_owner(fd)}, which is building the native kernels in {bdir} "
                 f"(waited {waited:.0f} s; it holds {bdir / LOCK_NAME})")
            report_at = waited + WAIT_REPORT_S
        time.sleep(0.2)


def _build():
    from torch.utils import cpp_extension

    cuda = want_cuda()
    bdir = build_dir(cuda)
    bdir.mkdir(parents=True, exist_ok=True)
    name = "exl2_native_" + bdir.name
    cflags = list(CFLAGS) + (["-DEXL2_WITH_CUDA"] if cuda else [])
    if cuda and os.environ.get("EXL2_CUDA_ARCHS"):
        archs = [a.strip() for a in os.environ["EXL2_CUDA_ARCHS"].split(";") if a.strip()]
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(_torch_arch(a) for a in archs)
    with build_lock(bdir):
        fresh = not any(bdir.glob(f"{name}*.so"))     # looked at under the lock: a build we waited for counts
        if fresh:
            _say(f"exl2: compiling the native kernels ({'CPU+CUDA' if cuda else 'CPU'}) into {bdir}; "
                 "first use only, about 30 s")
        t0 = time.time()
        mod = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources(cuda)],
            extra_cflags=cflags,
            extra_cuda_cflags=CUDA_FLAGS + ["-DEXL2_WITH_CUDA"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(bdir),
            with_cuda=cuda,
            verbose=os.environ.get("EXL2_EXT_VERBOSE", "") not in ("", "0"),
        )
    if fresh:
        log.info("exl2: native kernels built in %.0f s", time.time() - t0)
    return mod


def get():
    """The loaded extension module, building it on first use; None if disabled or the build failed."""
    global _module, _failed
    if disabled():
        return None
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                _module = _build()
            except Exception as e:     # noqa: BLE001 - any build problem means: use the reference
                reason = " ".join(str(e).split())[-300:] or type(e).__name__
                _failed = reason
                msg = f"exl2: native kernels unavailable ({reason}); using the torch reference path"
                log.warning(msg)
                print(msg, file=sys.stderr, flush=True)
    return _module


def failure() -> str | None:
    """Why the build failed in this process, or None."""
    return _failed
