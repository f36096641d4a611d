"""ONNX Runtime on CPU slices, CUDA GPUs or Ascend (CANN execution provider)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import BackendError, BackendOptions, InputSpec, logical_device

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cann": "CANNExecutionProvider",
}
_VISIBLE_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "cann": "ASCEND_RT_VISIBLE_DEVICES"}
_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(float16)": "float16"}


class OrtBackend:
    """One ONNX Runtime session bound to one device.

    CPU sessions get ``options.threads`` intra-op threads (the driver divides the host's
    cores between device actors) and may be pinned to ``options.cores``.
    """

    name = "onnxruntime"
    emulated = False

    def __init__(self, model: str | Path | None, device_id: int, options: BackendOptions):
        if model is None or isinstance(model, dict):
            raise BackendError("onnxruntime backend needs one .onnx file as --model")
        want = _PROVIDERS.get(options.provider)
        if want is None:
            raise BackendError(
                f"--provider: unknown {options.provider!r}; choose one of {', '.join(_PROVIDERS)}"
            )
        if want not in ort.get_available_providers():
            raise BackendError(
                f"--provider {options.provider}: {want} is not in this onnxruntime build "
                f"(has {', '.join(ort.get_available_providers())})"
            )
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if options.provider == "cpu":
            if options.cores:
                os.sched_setaffinity(0, options.cores)
            so.intra_op_num_threads = max(1, options.threads)
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            if options.threads > 1:
                # Spinning threads starve the preprocessing actors that share the host.
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers: list = [want]
        else:
            # The device actor narrowed the visible devices to its own: that one is logical 0.
            env = _VISIBLE_ENV[options.provider]
            logical = logical_device(device_id, os.environ.get(env))
            provider_options: dict[str, str] = {"device_id": str(logical)}
            if options.provider == "cann" and options.precision:
                provider_options["precision_mode"] = options.precision
            providers = [(want, provider_options), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model), so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many private types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"onnxruntime could not load {model}: {reason}") from None
        self.provider = self.session.get_providers()[0]
        if self.provider != want:
            raise BackendError(f"onnxruntime fell back to {self.provider} instead of {want}")
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
        self.input = InputSpec(inp.name, shape, _DTYPES.get(inp.type, inp.type))
        self.num_classes = int(out.shape[-1])
        self._output = out.name

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        logits = self.session.run([self._output], {self.input.name: batch})[0]
        return np.asarray(logits, dtype=np.float32), time.perf_counter() - t0

    def close(self) -> None:
        self.session = None
