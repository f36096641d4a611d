"""Which Ascend chip a runtime is given: CANN's reading of ASCEND_RT_VISIBLE_DEVICES, and the
check, once the runtime has counted its chips, that it really read it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import BackendError


def cann_visible_ids(value: str) -> list[int]:
    """The ids CANN reads from ASCEND_RT_VISIBLE_DEVICES: comma-separated digits from the start,
    up to the first other character (CANN 8.x env reference: ``"1, 2,3"`` means only 1)."""
    match = re.match(r"[0-9]+(?:,[0-9]+)*", value)
    return [int(i) for i in match.group(0).split(",")] if match else []


@dataclass(frozen=True)
class Placement:
    """The id the runtime is given for the chip cardrunner means, and its name in messages."""

    physical: int
    runtime_id: int
    where: str
    note: str = ""  # set when the runtime ignored ASCEND_RT_VISIBLE_DEVICES


def place(physical: int, visible: str | None, count: int | None) -> Placement:
    """Where chip ``physical`` is, given ASCEND_RT_VISIBLE_DEVICES and the chip count the runtime
    reports (None: not known yet; assume the runtime reads the variable).

    The variable is a "trial" one in the CANN 8.x env reference (ascending ids only) and no
    5.x/6.0 page documents it. Reading it can only shrink the count to the ids CANN parsed, so a
    larger count means this runtime ignored it and numbers chips physically. A chip that is
    listed but not first in the list (Ray's choice) stays the chip asked for.
    """
    if not visible:
        runtime, where, note = physical, f"device {physical}", ""
    else:
        listed = [int(p) for p in (s.strip() for s in visible.split(",")) if p.isdecimal()]
        target = physical if physical in listed or not listed else listed[0]
        ids = cann_visible_ids(visible)
        if count is not None and count > len(ids):
            runtime, where = target, f"device {target}"
            note = f"this CANN ignores ASCEND_RT_VISIBLE_DEVICES={visible}; chip {target} used"
        elif target in ids[: len(ids) if count is None else count]:
            runtime, note = ids.index(target), ""
            where = f"device {runtime} of ASCEND_RT_VISIBLE_DEVICES={visible}"
        else:
            sees = "" if count is None else f" and the runtime sees {count} chip(s)"
            raise BackendError(
                f"ASCEND_RT_VISIBLE_DEVICES={visible!r}: CANN reads {ids} (ascending ids up to "
                f"the first character that is not a digit or comma){sees}; chip {target} is "
                "not among them"
            )
    if count is not None and runtime >= count:
        raise BackendError(f"{where}: the runtime sees {count} Ascend chip(s)")
    return Placement(physical, runtime, where, note)
