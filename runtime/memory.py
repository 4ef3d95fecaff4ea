"""Memory facts of this process and this machine, for sizing work before it starts and reporting it after.

- :class:`PeakMemory` measures the peak resident memory of a stretch of work: the kernel's high-water mark
  (``VmHWM``, reset at the start where the kernel allows it) and the peak of *anonymous* memory, sampled by a
  thread (file-backed pages of memory-mapped checkpoints also count in ``VmHWM`` but can be reclaimed, so the
  anonymous peak is the number that must fit).
- :func:`available_memory` is what a new allocation can count on: ``MemAvailable``, capped by a cgroup limit
  (a container or a batch system's memory reservation) minus what the cgroup already uses.

Linux only (``/proc``, ``/sys/fs/cgroup``); elsewhere the functions return None and the sampler reports nothing.
"""
from __future__ import annotations

import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        for line in _STATUS.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def rss_anon() -> int | None:
    return _status_kib(("RssAnon",)).get("RssAnon")


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_anon`` and ``m.peak_rss`` (bytes, or None if unknown).

    ``peak_rss`` is the kernel's high-water mark over the block (exact, but it includes reclaimable file pages;
    without a reset it is the process's lifetime peak, and ``rss_reset`` says False).  ``peak_anon`` is the
    largest anonymous RSS seen by a sampler every ``interval`` seconds, so a spike shorter than that can be
    missed (torch allocations are freed as tensors die, so the tensors that make up a peak live far longer).
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_anon: int | None = None
        self.peak_rss: int | None = None
        self.rss_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            a = rss_anon()
            if a is not None and (self.peak_anon is None or a > self.peak_anon):
                self.peak_anon = a
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        self.rss_reset = reset_peak()
        self.peak_anon = rss_anon()
        self._thread = threading.Thread(target=self._sample, name="exl2-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        a = rss_anon()
        if a is not None and (self.peak_anon is None or a > self.peak_anon):
            self.peak_anon = a
        self.peak_rss = _status_kib(("VmHWM",)).get("VmHWM")

    def as_dict(self) -> dict:
        return {"peak_anon_bytes": self.peak_anon, "peak_rss_bytes": self.peak_rss}


def _cgroup_limit() -> int | None:
    """The memory this process's cgroup may still use (limit minus usage), or None without a limit."""
    try:
        rel = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::")), None)
    except OSError:
        return None
    if rel is None:
        return None
    d = Path("/sys/fs/cgroup") / rel.strip().lstrip("/")
    best = None
    while True:         # the tightest limit on the way up the hierarchy counts
        try:
            limit = (d / "memory.max").read_text().strip()
            if limit != "max":
                left = int(limit) - int((d / "memory.current").read_text().strip())
                best = left if best is None else min(best, left)
        except (OSError, ValueError):
            pass
        if d == Path("/sys/fs/cgroup") or d == d.parent:
            return best
        d = d.parent


def available_memory() -> int | None:
    """Bytes a new allocation can count on: ``MemAvailable``, or less under a cgroup limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    cg = _cgroup_limit()
    if cg is not None:
        avail = cg if avail is None else min(avail, cg)
    return avail


def total_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere).

    A loop that frees and reallocates many equal tensors of a few MB (a sparse block's experts, one after
    another) raises glibc's mmap threshold past their size, so they land on the heap, whose freed pages stay in
    the process.  Trimming after each expert keeps the process near its live set (docs/decisions/0013).
    """
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
