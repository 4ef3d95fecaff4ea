"""The launcher the sandbox runs (runtime/sandbox.py starts it; sandbox_programs.py holds the codec, the
sample's runner and the launcher's helpers), kept as Python source text: it builds the sample's root file
system, starts the sample, runs the checker and reports.  Nothing here runs in the evaluating process."""
from .sandbox_programs import _CODEC, _LAUNCHER_HELPERS

# L, then I (and A): the helpers, then building the root, starting the sample, the checker and the main flow.
_LAUNCHER = _CODEC + _LAUNCHER_HELPERS + r'''

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
