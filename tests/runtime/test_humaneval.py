"""exl2.runtime.humaneval: pass@k, completion truncation and the sandboxed runner (no model needed)."""
from __future__ import annotations

import math
import signal
import time

import pytest
from exl2.runtime import humaneval as he
from exl2.runtime import sandbox as sb


@pytest.mark.parametrize("n, c, k, want", [
    (5, 2, 1, 2 / 5),  # pass@1 = c / n
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (200, 1, 10, 10 / 200),  # 1 - C(199,10)/C(200,10) = 10/200
    (200, 0, 10, 0.0),
    (3, 2, 2, 1.0),  # n - c < k: every k-subset holds a pass
    (200, 200, 1, 1.0),
])
def test_pass_at_k_hand_values(n, c, k, want):
    assert he.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_pass_at_k_matches_binomial_formula():
    for n, c, k in [(200, 37, 10), (20, 5, 3), (200, 150, 100)]:
        assert he.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-10)


def test_mean_pass_at_k():
    assert he.mean_pass_at_k([(5, 2), (5, 5)], 1) == pytest.approx((0.4 + 1.0) / 2)
    assert he.mean_pass_at_k([(5, 2), (5, 5)], 10) is None  # fewer samples than k
    with pytest.raises(ValueError):
        he.pass_at_k(5, 6, 1)


@pytest.mark.parametrize("text, want, ended", [
    ("    return 1\n", "    return 1\n", False),
    ("    x = 1\n\n    return x\n\ndef g():\n", "    x = 1\n\n    return x\n", True),
    ("    return 1\nprint(2)", "    return 1", True),
    ("    if a:\n\treturn 1\n  \n", "    if a:\n\treturn 1\n  \n", False),  # indented / blank lines go on
])
def test_truncate_completion(text, want, ended):
    assert he.truncate_completion(text) == (want, ended)
    assert he.format_completion("  return 1 \n") == "    return 1"


@pytest.fixture(scope="module")
def problem():
    return he.load_problems(1)[0]  # HumanEval/0, has_close_elements


def test_problems_load():
    probs = he.load_problems()
    assert len(probs) == 164 and probs[0]["task_id"] == "HumanEval/0" and probs[-1]["task_id"] == "HumanEval/163"


def test_known_correct_completion_passes(problem):
    r = sb.run_sample(problem, problem["canonical_solution"])
    assert r.passed, r.stderr


def test_wrong_completion_fails(problem):
    r = sb.run_sample(problem, "    return True\n")
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr


def test_syntax_error_and_crash_fail_and_the_next_sample_still_runs(problem):
    assert not sb.run_sample(problem, "    return (\n").passed
    crash = "    import ctypes; ctypes.string_at(0)\n"  # segfault
    assert not sb.run_sample(problem, crash).passed
    for early_exit in ("    import os; os._exit(0)\n", "    import sys; sys.exit(0)\n"):
        r = sb.run_sample(problem, early_exit)  # exit status 0, but check() never finished
        assert not r.passed and "before the tests completed" in r.stderr
    assert sb.run_sample(problem, problem["canonical_solution"]).passed


def test_infinite_loop_is_killed_within_the_limit(problem):
    t = time.monotonic()
    r = sb.run_sample(problem, "    while True:\n        pass\n", timeout=2.0)
    elapsed = time.monotonic() - t
    assert r.status == "timeout" and not r.passed
    assert elapsed < 2.0 + 3.0  # the limit plus process start/kill slack


def test_cpu_limit_signal_counts_as_timeout():
    # what the kernel sends when the CPU-seconds limit runs out before the wall clock (it did on a busy CI box)
    r = sb.run_program("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)\n", timeout=5.0)
    assert r.status == "timeout" and not r.passed and r.returncode == -signal.SIGXCPU
    r = sb.run_program("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", timeout=5.0)
    assert r.status == "failed" and r.returncode == -signal.SIGTERM


def test_memory_limit(problem):
    r = sb.run_sample(problem, "    x = bytearray(4 << 30)\n    return x\n", memory_mb=1024)
    assert not r.passed and "MemoryError" in r.stderr


def test_os_system_cannot_create_a_file_outside_the_sandbox(problem, tmp_path):
    rep = sb.sandbox_report()
    if not (rep["readonly"] or rep["separate_uid"]):
        pytest.skip(f"neither a read-only file system nor a uid of its own for the sample here: {rep['degraded']}")
    target = tmp_path / "touched"
    code = f"    import os\n    os.system('touch {target}')\n    open({str(target)!r} + '2', 'w').write('x')\n"
    r = sb.run_sample(problem, code)
    assert not target.exists() and not (tmp_path / "touched2").exists()
    assert not r.passed  # the open() call raised (read-only file system or permission denied)


def test_sandbox_report_is_honest():
    """Print what holds here; the write and network checks must match the launcher's own claims."""
    rep = sb.sandbox_report()
    print(rep)
    if rep["readonly"]:
        assert rep["write_outside_blocked"]
    if rep["netns"]:
        assert rep["no_network_interfaces"]
    if rep["uid"] != 0:
        assert rep["subprocess_blocked"]


def test_the_sample_cannot_reach_the_network(problem):
    rep = sb.sandbox_report()
    if not rep["netns"]:
        pytest.skip("no network namespace on this machine: network is only discouraged (proxy variables)")
    code = ("    import socket\n    s = socket.socket()\n    s.settimeout(2)\n"
            "    s.connect(('1.1.1.1', 80))\n")
    r = sb.run_sample(problem, code)
    assert not r.passed and "OSError" in r.stderr or "unreachable" in r.stderr.lower()
