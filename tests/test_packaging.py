"""setup.cfg: the ONNX Runtime build is an extra, and only the CPU extras pull the CPU build.

onnxruntime, onnxruntime-gpu and onnxruntime-cann all install the package ``onnxruntime/``
and none declares the others, so pip installing the CPU ``onnxruntime`` beside a GPU or CANN
build overwrites it.  This reads the declared metadata (and, for what is installed here, the
declared requirements of every dependency, transitively).
"""

from __future__ import annotations

import configparser
import importlib.metadata as metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"
RUNTIMES = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu", "cann": "onnxruntime-cann"}
CPU_EXTRAS = {"cpu", "test"}  # the tests run on the CPU runtime


def declared() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)

    def reqs(text: str) -> list[Requirement]:
        return [Requirement(line) for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")]

    extras = {name: reqs(value) for name, value in cfg["options.extras_require"].items()}
    return reqs(cfg["options"]["install_requires"]), extras


def names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


def test_each_runtime_extra_brings_exactly_its_own_build() -> None:
    base, extras = declared()
    assert not names(base) & set(RUNTIMES.values())
    for extra, dist in RUNTIMES.items():
        assert names(extras[extra]) == {dist}


def test_only_cpu_extras_name_the_cpu_build() -> None:
    _, extras = declared()
    for extra, reqs in extras.items():
        if extra not in CPU_EXTRAS:
            assert "onnxruntime" not in names(reqs), extra


def installed_closure(reqs: list[Requirement]) -> set[str]:
    """Every installed distribution these requirements pull in (markers evaluated, no extras)."""
    todo, seen = list(reqs), set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(name) or []]
        except metadata.PackageNotFoundError:
            continue
        for extra in req.extras:  # e.g. ray[default]: follow that extra's requirements
            for r in metadata.requires(name) or []:
                parsed = Requirement(r)
                if parsed.marker and parsed.marker.evaluate({"extra": extra}):
                    parsed.marker = None
                    todo.append(parsed)
    return seen


def test_nothing_outside_the_cpu_extras_pulls_the_cpu_build_transitively() -> None:
    # Checked on what is installed here; onnxconverter-common 1.14-1.17 declare numpy, onnx,
    # packaging and protobuf only (microsoft/onnxconverter-common pyproject.toml).
    base, extras = declared()
    for extra, reqs in {"": [], **extras}.items():
        if extra in CPU_EXTRAS:
            continue
        closure = installed_closure(base + reqs)
        assert "onnxruntime" not in closure, f"[{extra}] pulls onnxruntime"
