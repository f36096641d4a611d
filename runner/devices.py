"""Parse ``--devices`` and find the devices a backend can drive.

Grammar (whitespace ignored)::

    spec  := "all" | item ("," item)*
    item  := [node ":"] range
    range := INT | INT "-" INT        # inclusive, ascending

A node prefix (``node1:0-3,node2:0-3``) applies to the ranges after it until the next
prefix; a spec without prefixes means "this host" (or any host, on a cluster).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_NODE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class DeviceSpecError(ValueError):
    """A ``--devices`` value that does not parse or names devices that do not exist."""


@dataclass(frozen=True, order=True)
class DeviceRef:
    """One device: its index on its node; ``node`` is None when not pinned to a host."""

    node: str | None
    index: int

    def __str__(self) -> str:
        return f"{self.node}:{self.index}" if self.node else str(self.index)


@dataclass(frozen=True)
class DeviceSelection:
    devices: tuple[DeviceRef, ...]  # empty when ``all``
    all: bool = False


def parse_devices(spec: str) -> DeviceSelection:
    """Parse a ``--devices`` string; raise ``DeviceSpecError`` with a one-line reason."""
    text = "".join(str(spec).split())
    if not text:
        raise DeviceSpecError("--devices: empty device list (use e.g. 0-3, 0,2,5, 3 or all)")
    if text == "all":
        return DeviceSelection((), all=True)
    node: str | None = None
    seen: set[DeviceRef] = set()
    out: list[DeviceRef] = []
    for item in text.split(","):
        if ":" in item:
            node, _, item = item.rpartition(":")
            if not _NODE.match(node):
                raise DeviceSpecError(f"--devices: bad node name {node!r} in {spec!r}")
        m = _RANGE.match(item)
        if not m:
            raise DeviceSpecError(
                f"--devices: cannot parse {item!r} in {spec!r} (use e.g. 0-3, 0,2,5, 3 or all)"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise DeviceSpecError(f"--devices: range {item!r} runs backwards in {spec!r}")
        for i in range(lo, hi + 1):
            ref = DeviceRef(node, i)
            if ref in seen:
                raise DeviceSpecError(f"--devices: device {ref} listed twice in {spec!r}")
            seen.add(ref)
            out.append(ref)
    return DeviceSelection(tuple(out))


def cpu_slots() -> int:
    """Cores this process may use (respects affinity masks and container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def resolve_devices(selection: DeviceSelection, available: int, what: str) -> list[DeviceRef]:
    """Check a selection against ``available`` devices of kind ``what`` on one host."""
    if selection.all:
        if available < 1:
            raise DeviceSpecError(f"--devices all: no {what} found")
        return [DeviceRef(None, i) for i in range(available)]
    missing = [d for d in selection.devices if d.index >= available]
    if missing:
        raise DeviceSpecError(
            f"--devices: {', '.join(map(str, missing))} requested but only {available} "
            f"{what} exist (0-{available - 1})"
        )
    return list(selection.devices)
