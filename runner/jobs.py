"""Declarative job files (TOML) and accuracy / speed gates.

One config path: defaults (``RunConfig``) < job file < command-line flags.
Relative paths in a job file are relative to the job file's own folder.

    [run]      backend, provider, devices, batch_sizes = [1, 16], recipe, out, workers, ...
    [model]    path = "m.onnx" | "manifest.json"   and/or   [model.by_batch_size] "16" = "x.om"
    [data]     images, labels, limit
    [gates]    top1, top5, tolerance (points below the figure allowed), min_fps
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .classes import IMAGENET_VAL
from .config import ConfigError, RunConfig
from .errors import one_line

_DATA_KEYS = {"images", "labels", "limit"}
#: [run] takes every RunConfig field except those of [model]/[data] and the test-only hook.
_RUN_KEYS = (set(RunConfig.__dataclass_fields__) - _DATA_KEYS
             - {"model", "backend_extra", "batch_size"}) | {"batch_sizes", "max_errors"}
_PATH_KEYS = {"out", "model", "images", "labels", "cache", "synsets"}


@dataclass(frozen=True)
class Gates:
    top1: float | None = None
    top5: float | None = None
    tolerance: float = 1.0  # the guide's rule: at most 1 point below the published figure
    min_fps: float | None = None

    def describe(self, timed: bool = True) -> str:
        """The thresholds checked, e.g. ``top1 >= 82.6%, card >= 100 img/s``; empty if none.

        ``timed`` False: the run timed nothing, so the speed gate was not checked."""
        parts = [f"{name} >= {want - self.tolerance:g}%" for name, want in
                 (("top1", self.top1), ("top5", self.top5)) if want is not None]
        if self.min_fps is not None and timed:
            parts.append(f"card >= {self.min_fps:g} img/s")
        return ", ".join(parts)


@dataclass
class Job:
    path: Path | None
    settings: dict[str, Any]  # RunConfig fields
    batch_sizes: list[int]
    models_by_batch: dict[int, str] = field(default_factory=dict)
    gates: Gates = Gates()
    max_errors: int = 0
    #: The commands the job's description gives for making its model (``python -m convert.``
    #: lines), named when the model does not exist yet; cleared when --model replaces it.
    make_model: tuple[str, ...] = ()

    def missing_model(self, model: str) -> str | None:
        """One line for a model file of this job that does not exist yet, naming the
        commands that make it; None when it exists or the job gives no command."""
        if not self.make_model or Path(model).exists():
            return None
        return (f"--model: {model} does not exist yet; the job {self.path} makes it with: "
                + "; then ".join(self.make_model))

    def config_for(self, batch_size: int) -> RunConfig:
        """RunConfig for one batch size of the sweep."""
        settings = dict(self.settings)
        if batch_size in self.models_by_batch:
            settings["model"] = self.models_by_batch[batch_size]
        settings["batch_size"] = batch_size
        if len(self.batch_sizes) > 1:
            settings["out"] = str(Path(settings.get("out", RunConfig.out)) / f"bs{batch_size}")
        return RunConfig(**settings)


def _section(doc: dict, name: str, allowed: set[str], path: Path) -> dict[str, Any]:
    sec = doc.get(name, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"--job: {path}: [{name}] must be a table")
    unknown = sorted(set(sec) - allowed)
    if unknown:
        raise ConfigError(f"--job: {path}: unknown key(s) in [{name}]: {', '.join(unknown)}")
    return sec


def load_job(path: str | Path) -> Job:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--job: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--job: cannot read {path}: {exc}") from None
    unknown = sorted(set(doc) - {"run", "model", "data", "gates", "description"})
    if unknown:
        raise ConfigError(f"--job: {path}: unknown section(s): {', '.join(unknown)}")
    run = _section(doc, "run", _RUN_KEYS, path)
    model = _section(doc, "model", {"path", "by_batch_size"}, path)
    data = _section(doc, "data", _DATA_KEYS, path)
    try:
        gates = Gates(**_section(doc, "gates", {"top1", "top5", "tolerance", "min_fps"}, path))
    except TypeError as exc:
        raise ConfigError(f"--job: {path}: [gates]: {exc}") from None

    description = doc.get("description", "")
    make = tuple(line.strip() for line in str(description).splitlines()
                 if line.strip().startswith("python -m convert."))
    try:
        return replace(_build_job(path, run, model, data, gates), make_model=make)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. max_errors = "x", by_batch_size key "a"
        raise ConfigError(f"--job: {path}: {one_line(exc)}") from None


def _build_job(path: Path, run: dict, model: dict, data: dict, gates: Gates) -> Job:
    base = path.parent
    settings: dict[str, Any] = {k: v for k, v in run.items() if k not in ("batch_sizes",
                                                                         "max_errors")}
    settings.update(data)
    if "path" in model:
        settings["model"] = model["path"]
    for key in _PATH_KEYS & settings.keys():
        value = str(settings[key])
        if "://" not in value and value != IMAGENET_VAL:  # URLs and named label sets stay
            settings[key] = str(base / value)
    by_batch = {int(k): str(base / v) for k, v in model.get("by_batch_size", {}).items()}
    sizes = run.get("batch_sizes", [RunConfig.batch_size])
    if not sizes or not all(isinstance(b, int) and b > 0 for b in sizes):
        raise ConfigError(f"--job: {path}: batch_sizes must be positive integers")
    return Job(path, settings, list(sizes), by_batch, gates, int(run.get("max_errors", 0)))


def check_gates(gates: Gates, accuracy: dict[str, Any], card_fps: float | None) -> list[str]:
    """One line per failed gate, naming the figure and the gap; empty when all pass.

    ``card_fps`` is None when nothing was timed (a resume with nothing left to run)."""
    failures = []
    for name in ("top1", "top5"):
        want = getattr(gates, name)
        if want is None:
            continue
        got = accuracy.get(name)
        if got is None:
            failures.append(f"{name} gate: no accuracy (run without labels)")
        elif got < want - gates.tolerance:
            failures.append(
                f"{name} gate failed: {got:.2f}% is {want - got:.2f} points below {want} "
                f"(tolerance {gates.tolerance})"
            )
    if gates.min_fps is not None and card_fps is not None and card_fps < gates.min_fps:
        failures.append(
            f"speed gate failed: card {card_fps:.2f} img/s is {gates.min_fps - card_fps:.2f} "
            f"below the minimum {gates.min_fps}"
        )
    return failures
