"""pycls checkpoints (``.pyth``): safe loading, strict matching, and writing test fixtures.

A pycls checkpoint is a ``torch.save`` dict ``{epoch, model_state, optimizer_state, cfg}``;
``model_state`` carries a ``module.`` prefix when it was saved from a DataParallel wrapper.
Files are only ever read with ``weights_only=True``: a checkpoint is untrusted input and full
unpickling would run arbitrary code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why in one line."""


def load_pycls_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a pycls checkpoint (or of a bare state-dict file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is not a torch checkpoint of tensors (safe weights-only loading refused it)"
        ) from None
    except Exception as exc:  # torch raises many types for foreign or damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {first}") from None
    state = obj.get("model_state", obj) if isinstance(obj, dict) else None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointError(f"{path} holds no model state dict (expected pycls model_state)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], limit: int = 5) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def save_pycls_checkpoint(
    model: nn.Module, path: str | Path, cfg_text: str, *, module_prefix: bool = False
) -> None:
    """Write ``model`` as pycls's trainer does (for tests and demos).

    ``module_prefix`` mimics a checkpoint saved from a DataParallel-wrapped model.
    """
    prefix = "module." if module_prefix else ""
    state = {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save(
        {
            "epoch": 0,
            "model_state": state,
            "optimizer_state": optimizer.state_dict(),
            "cfg": cfg_text,
        },
        path,
    )
