"""The programs the sandbox runs (runtime/sandbox.py starts them and reads their reports), kept as Python
source text: the codec shared by checker and sample, the sample's runner, and the first part of the launcher
(its configuration, system calls and helpers; runtime/sandbox_launcher.py adds the part that builds the isolation
and runs the checker).  Nothing here runs in the evaluating process."""

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

# L, then I (and A): trusted. The launcher's first part: its configuration, system calls and helpers;
# runtime/sandbox_launcher.py adds the rest. Reads its configuration (with the nonce) from stdin, reports on fd res_fd.
_LAUNCHER_HELPERS = r'''
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
'''
