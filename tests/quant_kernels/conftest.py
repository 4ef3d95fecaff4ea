"""Pinning the kernel path a block of test code takes, and tripping if it takes the other one.

``paths.reference()``: ``ops`` is forced onto its torch twins (``ops.reference_only()``) and the native
extension may not even be looked up (``ext.get`` raises inside), so whatever ran, ran in ``reference.py``.

``paths.native()``: the extension must be loaded (skipped when ``EXL2_NO_EXT`` is set, failed when the build
failed) and
``ops``' route to its torch twins is replaced by a tripwire, so an op that would fall back raises instead
of passing quietly on the reference.  Tests call ``reference.<op>`` directly for the expected values; that
is untouched.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from exl2.quant_kernels import ext, ops


class _Tripwire:
    def __getattr__(self, name):
        raise AssertionError(f"ops fell back to reference.{name} where the native kernel had to run")


@contextlib.contextmanager
def reference_path():
    saved = ext.get

    def consulted():
        raise AssertionError("the native extension was looked up on the forced reference path")

    ext.get = consulted
    try:
        with ops.reference_only():
            yield
    finally:
        ext.get = saved


@contextlib.contextmanager
def native_path():
    if ext.disabled():
        pytest.skip("EXL2_NO_EXT is set: native kernels disabled")
    if ext.get() is None:
        pytest.fail(f"the native extension did not build: {ext.failure()}")
    saved = ops.reference
    ops.reference = _Tripwire()
    try:
        yield
    finally:
        ops.reference = saved


@pytest.fixture
def paths():
    """``paths.reference()`` / ``paths.native()``: context managers described in this file's docstring."""
    return SimpleNamespace(reference=reference_path, native=native_path)


@pytest.fixture
def on_reference():
    """The whole test on the reference path (``paths.reference()`` around it)."""
    with reference_path():
        yield
