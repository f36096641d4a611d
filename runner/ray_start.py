"""Starting Ray: join a cluster, or start an embedded instance bound to loopback."""

from __future__ import annotations

import logging
import os

import ray


def bind_ray_to_loopback() -> None:
    """Keep every socket of Ray processes started from here on 127.0.0.1.

    On Linux Ray resolves "127.0.0.1" to the host's routable address; its single-host mode
    (the default on macOS and Windows) uses loopback.  The constant is read at import time,
    so it is set both for this process and, through the environment, for its children.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def start_ray(address: str | None, resources: dict[str, float], dashboard: bool = False) -> None:
    """Join ``address`` or start an embedded Ray bound to loopback (no dashboard unless asked)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray._private.accelerators.npu").setLevel(logging.ERROR)
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return
    bind_ray_to_loopback()
    ray.init(
        address="local",  # a new embedded instance, never a stray cluster on this host
        resources=resources,
        include_dashboard=dashboard,
        logging_level=logging.WARNING,
    )
