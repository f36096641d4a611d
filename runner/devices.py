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
from collections import Counter
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class NodeInfo:
    """One Ray node and how many devices of the requested kind it has."""

    node_id: str
    name: str  # label ``cardrunner.node``, else the host name (made unique with the node id)
    host: str
    address: str
    cpus: int
    devices: int

    def matches(self, name: str) -> bool:
        return name in (self.name, self.host, self.address) or (
            len(name) >= 6 and self.node_id.startswith(name)
        )


def cluster_nodes(resource: str | None, every_core_once: bool = False) -> list[NodeInfo]:
    """Alive Ray nodes with their count of ``resource``.

    Without a resource the devices are CPU slices: one per core for ``--devices all``, and
    up to ``cpu_devices`` when named (more slices than cores oversubscribe the host).
    """
    import ray

    raw = [n for n in ray.nodes() if n["Alive"]]
    hosts = Counter(n["NodeManagerHostname"] for n in raw)
    nodes = []
    for n in raw:
        host = n["NodeManagerHostname"]
        label = (n.get("Labels") or {}).get("cardrunner.node")
        name = label or (host if hosts[host] == 1 else f"{host}-{n['NodeID'][:6]}")
        cpus = int(n["Resources"].get("CPU", 0))
        if resource:
            count = int(n["Resources"].get(resource, 0))
        else:
            count = cpus if every_core_once else cpu_devices(cpus)
        nodes.append(NodeInfo(n["NodeID"], name, host, n["NodeManagerAddress"], cpus, count))
    return sorted(nodes, key=lambda n: n.name)


def cpu_devices(cores: int) -> int:
    """How many CPU slices may be named on a host of ``cores`` cores."""
    return max(8, cores)


def place_devices(
    selection: DeviceSelection, nodes: list[NodeInfo], what: str, local_node_id: str,
    missing: str = "",
) -> list[tuple[DeviceRef, NodeInfo]]:
    """Pin every selected device to a node; one-line ``DeviceSpecError`` when impossible.

    ``missing`` says what to check when no node has any device of the kind."""
    multi = len(nodes) > 1
    if not any(n.devices for n in nodes):
        where = "the cluster's nodes" if multi else "this host"
        raise DeviceSpecError(f"--devices: no {what} found: Ray sees none on {where}"
                              + (f"; {missing}" if missing else ""))
    if selection.all:
        return [(DeviceRef(n.name if multi else None, i), n)
                for n in nodes for i in range(n.devices)]
    with_devices = [n for n in nodes if n.devices]
    local = next((n for n in nodes if n.node_id == local_node_id), None)
    default = local if local is not None and local.devices else (
        with_devices[0] if len(with_devices) == 1 else None)
    placed = []
    for ref in selection.devices:
        if ref.node is None:
            node = default if multi else nodes[0]
            if node is None:
                raise DeviceSpecError(
                    f"--devices: {len(with_devices)} nodes have {what}; name the node of each "
                    f"device (e.g. {with_devices[0].name}:0-3) "
                    "or use all"
                )
        else:
            found = [n for n in nodes if n.matches(ref.node)]
            if len(found) != 1:
                known = ", ".join(n.name for n in nodes)
                why = "is ambiguous" if found else "is not in the cluster"
                raise DeviceSpecError(f"--devices: node {ref.node!r} {why} (nodes: {known})")
            node = found[0]
        if ref.index >= node.devices:
            where = f" on node {node.name}" if multi else ""
            raise DeviceSpecError(
                f"--devices: {ref} requested but only {node.devices} {what} exist{where}"
                + (f" (0-{node.devices - 1})" if node.devices else "")
            )
        placed.append((DeviceRef(node.name if multi else None, ref.index), node))
    if len({(n.node_id, r.index) for r, n in placed}) != len(placed):
        raise DeviceSpecError("--devices: the same device is listed twice")
    return placed


#: Custom Ray resource that counts emulated chips (one per emulated device actor).
EMULATED_RESOURCE = "emulated_npu"


@dataclass(frozen=True)
class DeviceKind:
    """How Ray counts, places and exposes one kind of device."""

    resource: str | None  # Ray resource held by each device actor; None: CPU slices
    visible_env: str | None  # variable through which the runtime sees only its own chip
    label: str  # what the devices are called in messages
    missing: str = ""  # what to check when Ray sees none


def device_kind(backend: str, provider: str) -> DeviceKind:
    if backend == "acl" or (backend == "onnxruntime" and provider == "cann"):
        return DeviceKind(
            "NPU", "ASCEND_RT_VISIBLE_DEVICES", "Ascend NPUs",
            "Ray counts a node's NPUs when the node starts, through CANN or /dev/davinci*: check "
            "that `npu-smi info` lists the chips and that CANN's set_env.sh was sourced before "
            "Ray started (with --address, restart that node's `ray start`; or declare them: "
            "ray start --resources='{\"NPU\": 4}')")
    if backend == "onnxruntime" and provider == "cuda":
        return DeviceKind(
            "GPU", "CUDA_VISIBLE_DEVICES", "GPUs",
            "Ray counts a node's GPUs when the node starts: check that `nvidia-smi` lists them "
            "and that CUDA_VISIBLE_DEVICES does not hide them (or: ray start --num-gpus N)")
    if backend == "emulated":
        return DeviceKind(EMULATED_RESOURCE, None, "emulated chips (--emulated-chips)",
                          "a cluster offers them with ray start --resources='{\"emulated_npu\": "
                          "4}'")
    return DeviceKind(None, None, "CPU slices")


def device_actor_options(kind: DeviceKind) -> dict[str, Any]:
    """Ray placement for one device actor: exactly one chip, no CPU reservation."""
    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 2}
    if kind.resource == "GPU":
        opts["num_gpus"] = 1
    elif kind.resource:
        opts["resources"] = {kind.resource: 1}
    return opts
