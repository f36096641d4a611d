"""Turning exceptions into the one-line messages every command prints."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """The innermost meaningful message of ``exc`` on one line, at most 300 characters.

    Ray wraps a remote error in a RayTaskError whose text is the whole remote traceback; its
    ``cause`` is the error itself.  Ray's own errors (ActorDiedError, ...) keep their type
    name and last line; other errors have their lines joined.
    """
    from ray.exceptions import RayError, RayTaskError  # here: the data tools need not import Ray

    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, RayTaskError):
        exc = cause
    if isinstance(exc, RayError):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def short_reason(reason: str, width: int = 100) -> str:
    """The first sentence of a one-line failure, for a table or log line (the whole line
    stays in perf.json)."""
    head = reason.split(". ", 1)[0].rstrip(".")
    return head if len(head) <= width else head[: width - 3] + "..."
