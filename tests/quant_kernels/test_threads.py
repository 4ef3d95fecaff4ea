"""core/threads.py: what depends on the thread count (LAPACK's factorisations only), that GPTQ's preparation and a
whole measurement give the same bits at any thread count, and how fit_threads follows the machine's load."""
from __future__ import annotations

import time

import pytest
import torch

from exl2.core import threads as T
from exl2.quant_kernels import gptq


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(T, "_base", 2)
    monkeypatch.setattr(T, "_last_check", float("-inf"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def _at(threads: int, fn):
    torch.set_num_threads(threads)
    return fn()


def test_only_factorisations_depend_on_the_thread_count(restore_threads):
    """The premise of core/threads.py, at SmolLM2's shapes: products, reductions and element-wise operations give
    the same bits with 1 and 2 threads; a Cholesky factorisation does not."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(4096, 576, generator=g), torch.randn(1536, 576, generator=g)
    h = a.T @ a
    same = {"matmul": lambda: a @ w.T, "gram": lambda: a.T @ a, "row norms": lambda: a.norm(dim=-1),
            "sum": lambda: a.sum(), "softmax": lambda: torch.softmax(a, -1), "silu": lambda: torch.nn.functional.silu(a)}
    for name, fn in same.items():
        assert torch.equal(_at(1, fn), _at(2, fn)), name
    chol = lambda: torch.linalg.cholesky(h)       # noqa: E731
    assert not torch.equal(_at(1, chol), _at(2, chol))     # why fixed_threads exists


def test_prepare_gives_the_same_bits_at_any_thread_count(restore_threads):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 576, generator=g)
    H = gptq.Hessian(576)
    H.add(x)
    h = H.result()
    one = _at(1, lambda: gptq.prepare(h))
    two = _at(2, lambda: gptq.prepare(h))
    assert torch.equal(one.perm, two.perm) and torch.equal(one.hinv, two.hinv)
    assert torch.get_num_threads() == 2                   # the count in use is restored after the factorisation


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_moe"])
def test_measurement_is_the_same_bytes_at_any_thread_count(restore_threads, tiny_qwen_rows, tiny_builder,
                                                           tiny_tokenizer, tmp_path, kind):
    """Also for a mixture of experts, whose experts' products have as few rows as tokens routed to them (on MKL
    with AVX-512, products of 5 to 11 rows differ between 1 and 2 threads unless the experts run at the base
    count)."""
    import shutil

    from exl2.calibration import default_rows
    from exl2.measure.measure import run_measurement

    if kind == "qwen2":
        d, ids = tiny_qwen_rows(2)
    else:
        d = tiny_builder(kind, tmp_path / "model", num_hidden_layers=2)
        shutil.copy(tiny_tokenizer, d / "tokenizer.json")
        ids = default_rows(d / "tokenizer.json", rows=4, length=64, vocab_size=512).input_ids
    for n in (1, 2):
        torch.set_num_threads(n)
        run_measurement(d, ids, tmp_path / str(n), provenance={"checkpoint_sha256": "x"})
    assert (tmp_path / "1" / "measurement.json").read_bytes() == (tmp_path / "2" / "measurement.json").read_bytes()


def test_fit_threads_follows_other_processes(restore_threads, monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    busy = [0]
    monkeypatch.setattr(T, "others_running", lambda: busy[0])
    assert T.fit_threads(force=True) == 2 and torch.get_num_threads() == 2
    busy[0] = 1                                   # another process keeps one CPU busy
    assert T.fit_threads() == 2                   # not looked again within CHECK_EVERY seconds
    assert T.fit_threads(force=True) == 1 and torch.get_num_threads() == 1
    busy[0] = 5
    assert T.fit_threads(force=True) == 1         # never below one
    busy[0] = 0
    assert T.fit_threads(force=True) == 2         # back to the base count, never above it
    monkeypatch.setattr(T, "others_running", lambda: None)      # no /proc/loadavg: the base count
    torch.set_num_threads(1)
    assert T.fit_threads(force=True) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")    # the user's (or Ray's) fixed count is left alone
    torch.set_num_threads(1)
    busy[0] = 0
    assert T.fit_threads(force=True) == 1


def test_others_running_is_the_median_look_less_this_process(monkeypatch):
    monkeypatch.setattr(T, "_own_runnable", lambda: 1)
    looks = iter([4, 10, 5])                      # a burst in one look does not count
    monkeypatch.setattr(T, "_runnable", lambda: next(looks))
    assert T.others_running(gap=0) == 4
    monkeypatch.setattr(T, "_runnable", lambda: 1)   # only this thread runs
    assert T.others_running(gap=0) == 0
    own = iter([2, 2, 1])                         # an OpenMP worker of ours still spinning is not another process
    monkeypatch.setattr(T, "_own_runnable", lambda: next(own))
    monkeypatch.setattr(T, "_runnable", lambda: 2)
    assert T.others_running(gap=0) == 0
    monkeypatch.setattr(T, "_runnable", lambda: None)
    assert T.others_running(gap=0) is None


def test_own_runnable_threads_are_counted():
    """This thread is runnable while it looks; so is a thread of ours busy in a product (no GIL held)."""
    import threading

    assert T._own_runnable() >= 1
    stop = threading.Event()

    def spin():
        a = torch.randn(256, 256)
        while not stop.is_set():
            a @ a

    t = threading.Thread(target=spin)
    t.start()
    try:
        assert max(T._own_runnable() for _ in range(200)) >= 2
    finally:
        stop.set()
        t.join()


def test_a_busy_process_is_counted_as_another():
    import subprocess
    import sys

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert max(T.others_running() for _ in range(5)) >= 1
    finally:
        spinner.kill()
        spinner.wait()
