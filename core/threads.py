"""Threads on a shared machine: the heavy loops use the CPUs other processes leave free, and the operations whose
results depend on the thread count keep one fixed count so that results do not depend on the load.

Two conversions that each run as many OpenMP threads as there are cores wait on each other's spinning threads
(bench/bench_threads.py; numbers and the policies tried: docs/decisions/0014).  So the measurement and
quantization loops call :func:`fit_threads` as they go (the converter also looks at the start of every stage and
in the loops of the KV profile and the validation, so no stage keeps a count set for an earlier one); at most
every ``CHECK_EVERY`` seconds it counts the runnable threads of other processes and sets torch's thread count to
the CPUs they leave free (at least 1, at most the base count).

The base count is torch's count when first asked (the CPUs this process may use, or ``OMP_NUM_THREADS``).  Of
the operations the converter runs on a CPU, LAPACK's factorisations (Cholesky, its inverse, triangular solves)
give results whose last bits depend on the thread count, and so do matrix products of a few rows on some builds
(MKL with AVX-512: 5 to 11 rows differ between 1 and 2 threads), which a mixture of experts makes for the experts
that get few tokens.  Products of whole rows of tokens, reductions and element-wise operations do not
(tests/quant_kernels/test_threads.py).  :func:`fixed_threads` runs the factorisations and the experts with the
base count, so a conversion's bytes stay those of an idle machine whatever the load did to the other loops.

Nothing adapts where the user fixed the count (``OMP_NUM_THREADS`` set, as Ray does for its tasks).
"""
from __future__ import annotations

import contextlib
import os
import time

CHECK_EVERY = 2.0      # seconds between two looks at the machine's load

_base: int | None = None
_last_check = float("-inf")


def base_threads() -> int:
    """The thread count of the factorisations (and the most :func:`fit_threads` gives)."""
    global _base
    if _base is None:
        import torch

        _base = torch.get_num_threads()
    return _base


def set_base_threads(n: int) -> None:
    """Fix the base count (a Ray task measuring a layer range with the driver's count), and use it now."""
    import torch

    global _base
    _base = max(1, int(n))
    torch.set_num_threads(_base)


@contextlib.contextmanager
def fixed_threads():
    """Run the block with the base thread count (for operations whose results depend on it: see the module's
    docstring), then restore the current one."""
    import torch

    now, base = torch.get_num_threads(), base_threads()
    if now == base:
        yield
        return
    torch.set_num_threads(base)
    try:
        yield
    finally:
        torch.set_num_threads(now)


def _runnable() -> int | None:
    """Threads runnable on the machine right now (the kernel's count in /proc/loadavg), or None."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _own_runnable() -> int:
    """Threads of this process that are runnable now (state R in /proc/self/task/*/stat): this one, and OpenMP
    workers still spinning after a parallel region.  1 where that cannot be read."""
    n = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/stat") as f:
                n += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return max(n, 1)


def others_running(samples: int = 3, gap: float = 0.005) -> int | None:
    """Runnable threads of other processes: the median of a few looks, each the machine's count less this
    process's own runnable threads (this one, and OpenMP workers that spin for a while after each parallel region:
    counted as others, they made a conversion alone on the machine drop to one thread)."""
    seen = []
    for i in range(samples):
        n = _runnable()
        if n is None:
            return None
        seen.append(n - _own_runnable())
        if i + 1 < samples:
            time.sleep(gap)
    return max(0, sorted(seen)[len(seen) // 2])


def fit_threads(force: bool = False) -> int:
    """Set torch's thread count to the CPUs other processes leave free, at most the base count and at least 1; looks
    at most every ``CHECK_EVERY`` seconds unless ``force``.  Returns the count in use."""
    import torch

    global _last_check
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    now = time.monotonic()
    if not force and now - _last_check < CHECK_EVERY:
        return torch.get_num_threads()
    _last_check = now
    base, others = base_threads(), others_running()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = base if others is None else max(1, min(base, cpus - others))
    if want != torch.get_num_threads():
        torch.set_num_threads(want)
    return want
