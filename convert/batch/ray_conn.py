"""Ray for exl2-batch and ``exl2-convert --ray``: importing it, connecting to a cluster or starting a local
instance that talks to nobody but itself, and checking a HOST:PORT before Ray's own retries would hang.

Ray is optional (``pip install exl2[cluster]``) and imported only inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import os

from exl2.core.errors import UserError

INSTALL_HINT = "exl2-batch needs Ray: pip install 'exl2[cluster]' (or: pip install ray)"


class BatchError(UserError, RuntimeError):
    """The batch cannot start (Ray missing, no cluster at --address, infeasible resources)."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise BatchError(INSTALL_HINT) from None
    return ray


def connect(ray, address: str | None, num_cpus: int | None, object_store_mb: int | None,
            flag: str = "--address") -> bool:
    """Connect to a cluster (address) or start a local instance; True if this call started Ray.  ``flag``: the
    option the user gave the address with, for the messages."""
    if address and address != "auto" and "://" not in address:
        probe(address, flag=flag)
    if ray.is_initialized():
        return False
    import logging

    kw = dict(include_dashboard=False, logging_level=logging.WARNING)
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            with local_ray_settings():
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1,
                         object_store_memory=(object_store_mb or 256) * 1024 * 1024,
                         _node_ip_address="127.0.0.1", **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise BatchError(f"{flag} {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})"
                         if address else f"cannot start a local Ray instance ({str(e).splitlines()[0]})") from None
    return True


# What a local Ray instance (no --address) is started with so that it talks to nobody but itself.  Ray's
# defaults would make it look for the machine's outward address (a UDP socket "connected" to 8.8.8.8:53)
# and start an API server whose usage-stats module asks the cloud metadata services (169.254.169.254,
# after a DNS lookup of metadata.google.internal) which cloud it runs on, whether or not usage stats are
# enabled.  The environment is inherited by every process ray.init starts (GCS, raylet, agents) and,
# through the raylet, by every worker.
LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's switch for a single-machine instance (the default on Windows and macOS): the node address is
    # 127.0.0.1 instead of the address of the route to the internet.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def _usage_stats_explicitly_on() -> bool:
    """True if the user turned Ray's usage stats on (environment or ~/.ray/config.json)."""
    if os.environ.get("RAY_USAGE_STATS_ENABLED") == "1":
        return True
    try:
        from ray._common.usage import usage_lib

        return usage_lib._usage_stats_enabledness() is usage_lib.UsageStatsEnabledness.ENABLED_EXPLICITLY
    except Exception:       # noqa: BLE001 - another Ray layout: only the environment counts
        return False


@contextlib.contextmanager
def local_ray_settings():
    """Around ray.init of a local instance: the settings of LOCAL_RAY_ENV, and no API server process.

    A variable the user set is left as it is; a user who turned usage stats on also keeps the API server
    (it is the process that reports them).  Everything is undone on exit: processes started inside keep
    what they inherited, the calling process gets its own environment back.
    """
    saved = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
    patches = []                      # (object, attribute, original value)
    try:
        usage_on = _usage_stats_explicitly_on()
        for key, value in LOCAL_RAY_ENV.items():
            if key in os.environ or (key == "RAY_USAGE_STATS_ENABLED" and usage_on):
                continue
            os.environ[key] = value
            if key == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":
                # ray read this variable when it was imported; the driver needs the value now too.
                with contextlib.suppress(ImportError):
                    from ray._private import ray_constants

                    if hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
                        patches.append((ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER))
                        ray_constants.ENABLE_RAY_CLUSTER = False
        if not usage_on:
            # With include_dashboard=False the API server runs only the usage-stats module (and that one
            # probes the clouds at start); Ray's own path for an API server that failed to start is taken.
            with contextlib.suppress(ImportError):
                from ray._private import services

                if hasattr(services, "start_api_server"):
                    patches.append((services, "start_api_server", services.start_api_server))
                    services.start_api_server = _no_api_server
        yield
    finally:
        for obj, attr, value in reversed(patches):
            setattr(obj, attr, value)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _no_api_server(*args, **kwargs):
    return "", None           # (dashboard URL, process): no URL, no process


def probe(address: str, timeout: float = 10.0, flag: str = "--address") -> None:
    """Fail fast on an unreachable HOST:PORT (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BatchError(f"{flag} {address}: expected 'auto' or HOST:PORT (the head node's GCS, port 6379 by default)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise BatchError(f"{flag} {address}: no Ray head node answers there ({e.strerror or e}); "
                         "start one with `ray start --head`") from None


def first_line(e: BaseException) -> str:
    """``Type: first non-empty line of the message`` (at most 300 characters): a remote error in one line."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"[:300]
