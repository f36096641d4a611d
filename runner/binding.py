"""Which chip a device actor drives, and how its runtime is made to see only that chip.

``--devices 1`` names the node's device 1 *as the node lists them*: on a node started with
``CUDA_VISIBLE_DEVICES=1,3 ray start --num-gpus=2`` that is GPU 3, on one started with
``CUDA_VISIBLE_DEVICES=GPU-8f..,GPU-2c..`` the second UUID. Ray numbers the same list: its
accelerator ids are the node's own entries, not 0..n-1 (read in Ray 2.40.0 and 2.60.0,
``python/ray/_private/worker.py``: ``Worker.original_visible_accelerator_ids`` records the
variable when the worker process starts, and ``get_accelerator_ids_for_accelerator_resource``
maps the raylet's slot ``i`` to its ``i``-th entry; ``_raylet.pyx`` then sets the variable of an
actor to its ids before ``__init__`` unless ``RAY_EXPERIMENTAL_NOSET_<VARIABLE>`` is set).

The actor sets the variable to the one chip it drives, so the runtime sees it as logical 0,
whether it is a number or a UUID. With ``--devices all`` that chip is the one Ray reserved for
the actor. A named chip is bound even when Ray reserved another for the actor, because Ray
cannot reserve a particular one: its GPU / NPU resource is a count that the raylet fills with
the node's first free instances (``src/ray/common/scheduling/resource_instance_set.cc``,
``NodeResourceInstanceSet::TryAllocate``, read at ray-project/ray 0678da2), and every per-chip
figure is labelled by the chip named. Both ids are kept in the device's info;
``reservation_notes`` tells a harmless permutation (a node's actors reserved exactly the chips
they drive) from a gap, where Ray may hand a driven chip to other work on the node.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

#: Ray's resource behind each visible-devices variable (Ray 2.60 ``_private/accelerators/
#: nvidia_gpu.py``: GPU / CUDA_VISIBLE_DEVICES; ``npu.py``: NPU / ASCEND_RT_VISIBLE_DEVICES).
RAY_RESOURCE = {"CUDA_VISIBLE_DEVICES": "GPU", "ASCEND_RT_VISIBLE_DEVICES": "NPU"}


class BindingError(ValueError):
    """The named chip is not on the node, or Ray gave one device actor several chips."""


@dataclass(frozen=True)
class Binding:
    """The chip one device actor drives."""

    index: int  # its position in the node's own list: what --devices names
    chip: str | None  # the node's id for it, now the whole visible variable; None: CPU slices
    device_id: int  # handed to the runtime: the chip's number (a UUID has none: its index)
    ray_assigned: str | None  # the ids Ray reserved for this actor, comma-joined


def bind(
    index: int,
    variable: str | None,
    named: bool,
    environ: MutableMapping[str, str],
    reserved: list[str],
    node_ids: list[str] | None,
) -> Binding:
    """Choose the chip and narrow ``environ[variable]`` to it.

    ``index``: the device's number in ``--devices``; ``named``: False for ``--devices all``;
    ``reserved``: the ids Ray gave this actor; ``node_ids``: the node's own list (None: the node
    had no variable, its chips are 0..n-1).
    """
    if variable is None:
        return Binding(index, None, index, None)
    listed = None if node_ids is None else [i.strip() for i in node_ids]
    ray_assigned = ",".join(i.strip() for i in reserved) or None
    if not named and reserved:
        if len(reserved) != 1:
            raise BindingError(
                f"Ray gave one device actor {variable} ids {reserved}; a device takes one chip "
                f"(does a runtime_env narrow {variable} below the node's list?)"
            )
        chip = reserved[0].strip()
        if listed is None and chip.isdecimal():
            index = int(chip)
        elif listed is not None and chip in listed:
            index = listed.index(chip)
    elif listed is None:
        chip = str(index)
    elif index < len(listed):
        chip = listed[index]
    else:
        raise BindingError(
            f"--devices: device {index} requested but this node lists {len(listed)} chip(s) in "
            f"{variable}={','.join(listed)}"
        )
    environ[variable] = chip
    return Binding(index, chip, int(chip) if chip.isdecimal() else index, ray_assigned)


def bind_device(index: int, variable: str | None, named: bool) -> Binding:
    """``bind`` inside a Ray actor, with the ids Ray reserved and the node's list as Ray saw it."""
    if variable is None:
        return bind(index, None, named, os.environ, [], None)
    import ray
    from ray._private.worker import global_worker

    resource = RAY_RESOURCE[variable]
    reserved = ray.get_runtime_context().get_accelerator_ids().get(resource, [])
    node_ids = global_worker.original_visible_accelerator_ids.get(resource)
    return bind(index, variable, named, os.environ, list(reserved), node_ids)


def reservation_notes(infos: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per node whose device actors drive other chips than Ray reserved for them.

    ``infos``: the devices' info (``node_id``, ``host``, ``chip``, ``ray_assigned``). Chips
    driven in another order than reserved are not reported: the node's reservation still covers
    exactly what runs.
    """
    driven: dict[str, set[str]] = defaultdict(set)
    held: dict[str, set[str]] = defaultdict(set)
    hosts: dict[str, str] = {}
    for info in infos:
        if info.get("chip") is None:
            continue
        node = str(info.get("node_id", ""))
        hosts[node] = f"{info.get('host', '')} (node {node[:8]})"
        driven[node].add(str(info["chip"]))
        held[node].update(filter(None, str(info.get("ray_assigned") or "").split(",")))
    return [
        f"{hosts[node]}: drives chips {_listed(driven[node])} as named, but Ray reserved "
        f"{_listed(held[node]) or 'none'} for them; Ray may give chips "
        f"{_listed(driven[node] - held[node])} to other work on that node meanwhile"
        for node in sorted(driven)
        if driven[node] != held[node]
    ]


def _listed(chips: set[str]) -> str:
    """Chip ids in numeric order (10 after 9), UUIDs after numbers."""
    return ", ".join(sorted(chips, key=lambda c: (not c.isdecimal(), len(c), c)))
