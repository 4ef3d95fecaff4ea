"""The build lock of the native extension (quant_kernels/ext.py): a build killed inside torch's
cpp_extension.load leaves torch's lock file behind, and torch then waits for it forever without a word.

The compiler is not run here: ``cpp_extension.load`` is replaced by a stand-in that takes torch's own
``FileBaton`` on ``<build>/lock`` exactly as ``_jit_compile`` does (the holder builds and removes the file;
any other process polls until the file is gone), so the lock behaviour is torch's and a test takes
seconds.  Every wait has a timeout: a regression fails instead of hanging.
"""
from __future__ import annotations

import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from exl2.quant_kernels import ext

pytestmark = pytest.mark.skipif(ext.fcntl is None, reason="the build lock needs fcntl.flock (POSIX)")

# A process that "builds" through ext.get() with the stand-in; T_HOLD=1 keeps it inside torch's baton
# until the file $T_MARKS/release exists.  It prints what get() returned.
BUILDER = r"""
import os, sys, time, pathlib
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton
from exl2.quant_kernels import ext

ext.WAIT_FIRST_REPORT_S = float(os.environ.get("T_FIRST", "2"))
ext.WAIT_REPORT_S = float(os.environ.get("T_EVERY", "30"))
marks = pathlib.Path(os.environ["T_MARKS"])

def load(name, sources, build_directory, **kwargs):
    baton = FileBaton(os.path.join(build_directory, "lock"))
    if baton.try_acquire():
        try:
            (marks / f"start-{os.getpid()}").write_text(str(time.time()))
            while os.environ.get("T_HOLD") and not (marks / "release").exists():
                time.sleep(0.05)
            (marks / f"end-{os.getpid()}").write_text(str(time.time()))
        finally:
            baton.release()
    else:
        baton.wait()
    return f"module of {os.getpid()}"

cpp_extension.load = load
print(ext.get(), flush=True)
"""


def fake_load(calls: list):
    """The same stand-in, in this process."""
    def load(name, sources, build_directory, **kwargs):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():
            try:
                calls.append("built")
            finally:
                baton.release()
        else:
            baton.wait()
            calls.append("waited")
        return "module"
    return load


def in_thread(fn):
    """Run fn in a daemon thread; returns (thread, result list)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    """A private EXL2_EXT_DIR; returns the build folder ext would use in it."""
    monkeypatch.setenv("EXL2_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("EXL2_NO_EXT", raising=False)
    bdir = ext.build_dir(ext.want_cuda())
    bdir.mkdir(parents=True)
    return bdir


def builder(bdir: Path, marks: Path, **env) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "EXL2_NO_EXT"}
    e.update(EXL2_EXT_DIR=str(bdir.parent), T_MARKS=str(marks), OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, "-c", BUILDER], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"builder exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def test_stale_lock_files_do_not_stop_the_build(ext_dir, monkeypatch, capfd):
    """torch's lock file of a killed build plus our lock file last written by a dead process: the build
    goes on (torch's baton alone keeps waiting), the leftover is removed and that is said on stderr."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ext_dir / "lock").write_text("")
    (ext_dir / ext.LOCK_NAME).write_text(f"{dead.pid} {platform.node()}\n")
    calls = []
    monkeypatch.setattr(cpp_extension, "load", fake_load(calls))

    # Control: torch's own load waits on the leftover file (and would forever).
    plain, plain_out = in_thread(lambda: cpp_extension.load(name="x", sources=[], build_directory=str(ext_dir)))
    plain.join(1.0)
    assert plain.is_alive() and plain_out == []

    built, out = in_thread(ext._build)
    built.join(30)
    assert not built.is_alive(), "ext._build hung on the stale lock"
    assert out == ["module"] and "built" in calls
    plain.join(5)                                # the leftover is gone, so the control gets through too
    assert not plain.is_alive()
    assert not (ext_dir / "lock").exists()
    assert (ext_dir / ext.LOCK_NAME).read_text().split()[0] == str(os.getpid())
    err = capfd.readouterr().err
    assert (f"exl2: removed {ext_dir / 'lock'}, a lock left by an interrupted build of the native kernels "
            f"(the last process to use this folder: process {dead.pid} on {platform.node()})") in err


def test_killed_builder_does_not_block_the_next_one(ext_dir, tmp_path):
    """A builder SIGKILLed inside torch's baton leaves torch's lock file; the next process builds."""
    marks = tmp_path / "marks"
    marks.mkdir()
    first = builder(ext_dir, marks, T_HOLD="1")
    wait_for(marks / f"start-{first.pid}", first)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert (ext_dir / "lock").exists()           # what a killed build leaves
    second = builder(ext_dir, marks)
    try:
        out, err = second.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        second.kill()
        raise AssertionError(f"the second build hung: {second.communicate()[1][-2000:]}") from None
    assert second.returncode == 0, err[-2000:]
    assert out.strip() == f"module of {second.pid}"
    assert f"exl2: removed {ext_dir / 'lock'}, a lock left by an interrupted build" in err
    assert f"(the last process to use this folder: process {first.pid} on {platform.node()})" in err
    assert (marks / f"end-{second.pid}").exists() and not (ext_dir / "lock").exists()


def test_waiting_for_a_live_builder_is_said(ext_dir, tmp_path):
    """A second process waits for a live builder, says which process it waits for (and again while it
    waits), leaves the live builder's torch lock alone, and builds after it."""
    marks = tmp_path / "marks"
    marks.mkdir()
    first = builder(ext_dir, marks, T_HOLD="1")
    second = None
    try:
        wait_for(marks / f"start-{first.pid}", first)
        second = builder(ext_dir, marks, T_FIRST="0.5", T_EVERY="1")
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in second.stderr], daemon=True).start()
        want = (f"exl2: waiting for process {first.pid} on {platform.node()}, which is building the native "
                f"kernels in {ext_dir}")
        waiting = []
        deadline = time.time() + 120
        while len(waiting) < 2:                  # the first line, then the repeat
            try:
                line = lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                raise AssertionError(f"no waiting line within 120 s (got {waiting})") from None
            assert "removed" not in line, line   # a live builder's lock is not stale
            if line.startswith(want):
                waiting.append(line)
        waited = [int(re.search(r"\(waited (\d+) s; it holds (.*)\)$", w.rstrip()).group(1)) for w in waiting]
        assert waited[1] > waited[0]
        assert all(w.rstrip().endswith(f"it holds {ext_dir / ext.LOCK_NAME})") for w in waiting)
        assert second.poll() is None and not (marks / f"start-{second.pid}").exists()
        (marks / "release").touch()
        assert first.wait(60) == 0 and second.wait(60) == 0
        assert second.stdout.read().strip() == f"module of {second.pid}"
        assert float((marks / f"start-{second.pid}").read_text()) >= float((marks / f"end-{first.pid}").read_text())
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
