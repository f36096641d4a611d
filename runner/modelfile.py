"""What a ``--model`` is: its metadata (recipe, precision) and a hash of every file it uses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from .config import ConfigError


def file_sha256(*paths: str | Path) -> str:
    """SHA-256 over the given files' bytes, in order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file, read without its weights' external data."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ConfigError(f"--model: {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have many types
        raise ConfigError(f"--model: {path} is not a readable ONNX model ({exc})") from None
    return {p.key: p.value for p in model.metadata_props}


def describe_model(path: str | Path) -> tuple[dict[str, str], str]:
    """(cardrunner metadata, sha256) of an .onnx, a convert.onnx2om manifest or an .om.

    A manifest's recipe and precision come from the manifest; its hash covers the manifest
    and every .om it lists, so a swapped .om is noticed by --resume.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--model: {path} does not exist")
    if path.suffix == ".onnx":
        return onnx_metadata(path), file_sha256(path)
    if path.suffix == ".json":
        try:
            manifest = json.loads(path.read_text())
            oms = [path.parent / rel for rel in manifest["models"].values()]
        except (ValueError, KeyError, AttributeError, TypeError):
            raise ConfigError(f"--model: {path} is not a convert.onnx2om manifest") from None
        missing = [str(p) for p in oms if not p.exists()]
        if missing:
            raise ConfigError(f"--model: {path} lists missing files: {', '.join(missing)}")
        meta = {"cardrunner.recipe": manifest.get("recipe", ""),
                "cardrunner.precision": manifest.get("precision", ""),
                "cardrunner.arch": manifest.get("arch", "")}
        return {k: v for k, v in meta.items() if v}, file_sha256(path, *oms)
    return {}, file_sha256(path)
