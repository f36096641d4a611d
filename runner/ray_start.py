"""Starting Ray: join a cluster, or start an embedded instance bound to loopback."""

from __future__ import annotations

import logging
import os
import secrets

import ray

from .reaper import reap_after_exit

AUTH_HINT = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and give this "
             "host the head's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")


def bind_ray_to_loopback() -> None:
    """Keep every socket of Ray processes started from here on 127.0.0.1.

    On Linux Ray resolves "127.0.0.1" to the host's routable address; its single-host mode
    (the default on macOS and Windows) uses loopback.  The constant is read at import time,
    so it is set both for this process and, through the environment, for its children.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def use_own_token(dashboard: bool) -> None:
    """Token authentication for the embedded instance, with a token of its own.

    Loopback is reachable by every local user, so authentication stays on.  Ray 2.60's
    ``ray.init`` turns it on when ``RAY_AUTH_MODE`` is unset, warning that it did so, and
    uses (or creates, with the umask's permissions) ``~/.ray/auth_token``, a file whose mere
    presence also turns token authentication on for the user's later ``ray start --head``
    (``authentication_token_setup.enable_token_auth_by_default`` /
    ``maybe_enable_token_auth_if_token_available``).  Setting the mode explicitly is how
    Ray says "chosen, no warning"; a fresh ``RAY_AUTH_TOKEN`` (first in the C++
    AuthenticationTokenLoader's order, before RAY_AUTH_TOKEN_PATH and the file) lives only
    in the environment of this process and its Ray processes, which only this user can
    read.  With ``--dashboard`` the browser needs the token, so Ray's file is used instead
    (``ray get-auth-token`` prints it).  A mode (``disabled`` included) or a token the user
    set is kept.
    """
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if (mode.lower() == "token" and not dashboard
            and not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ)):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # as Ray's own generator
    # The driver's RayConfig read RAY_* variables when ray was imported; this re-reads them,
    # as Ray does after setting the mode (authentication_token_setup._enable_token_auth).
    ray._raylet.Config.initialize("")


def token_refused(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what caused it is a GCS refusing this process's token.

    Ray >= 2.52 (token authentication) raises AuthenticationError, but ``ray.init`` with an
    address retries and then raises ConnectionError from a RuntimeError that carries the
    last attempt only as text ("... InvalidAuthToken: Authentication token is missing or
    incorrect", Ray 2.60 ``node._init_gcs_client``)."""
    refused = getattr(ray.exceptions, "AuthenticationError", ())
    while exc is not None:
        if isinstance(exc, refused) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def join(address: str) -> None:
    """Connect to a running cluster; a refused token says what to set."""
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except Exception as exc:
        if token_refused(exc):
            raise ConnectionError(AUTH_HINT) from None
        raise


def start_ray(address: str | None, resources: dict[str, float], dashboard: bool = False) -> None:
    """Join ``address`` or start an embedded Ray bound to loopback (no dashboard unless asked)
    whose processes all end with this one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray._private.accelerators.npu").setLevel(logging.ERROR)
    if address:
        join(address)
        return
    bind_ray_to_loopback()
    use_own_token(dashboard)
    ray.init(
        address="local",  # a new embedded instance, never a stray cluster on this host
        resources=resources,
        include_dashboard=dashboard,
        logging_level=logging.WARNING,
    )
    reap_after_exit(ray._private.worker._global_node.get_session_dir_path())
