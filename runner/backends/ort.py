"""ONNX Runtime on CPU slices, CUDA GPUs or Ascend chips (CUDA / CANN execution providers).

The runtime is the user's choice of distribution (setup.cfg extras ``cpu`` -> onnxruntime,
``cuda`` -> onnxruntime-gpu, ``cann`` -> onnxruntime-cann); all three install the same
``onnxruntime`` package, so it is imported only when a session opens, with a one-line error
naming the extra when it is missing.

The accelerator paths are written against microsoft/onnxruntime's sources and tested only
against tests/fake_ort.py; they have not run on a GPU or an Ascend chip here:

* No silent fallback.  ``InferenceSession`` retries on ``["CPUExecutionProvider"]`` when the
  accelerator session cannot be created, and ``Session.run`` retries once on CPU after an EP
  failure (python/onnxruntime_inference_collection.py, read in 1.24.4 and 1.32).  Creation: the
  session must report the provider asked for.  Runs: ``disable_fallback()``: a failing chip
  raises.
* Shape-stable accelerator calls.  The CANN EP compiles a graph per input shape when it first
  sees it (cann_execution_provider.cc ``Compile``: ``<node>_<hash of input shape>.om``) and the
  CUDA EP's default ``cudnn_conv_algo_search`` is EXHAUSTIVE (cuda_execution_provider_info.h),
  a benchmark per new shape: a batch smaller than one already run (warm-up runs the run's
  batch size) is zero-padded to it, so a short last batch never compiles inside the timed call.
* CANN's compile cache.  The EP loads ``<node>.om`` from the working directory when it exists,
  else builds and writes it (``dump_om_model``, default true); ``<node>`` hashes the model's
  *path* (framework/model_metadef_id_generator.cc), not its content or the precision mode.  A
  CANN session therefore runs in its own directory keyed by the model's SHA-256, the precision
  mode and the chip, so a re-exported model or another ``--precision`` never loads a stale
  graph and two actors never write one file.
* Threads.  Accelerator sessions get at most two intra-op threads, not spinning: they only run
  the nodes the accelerator lacks, and must not compete with the decoders on the host.
  IO binding was not adopted: the host -> device copy inside the timed call is the same bytes
  either way here, and its gain (pinned memory, overlap) shows only on a real GPU.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from ..demo import cache_dir
from ..modelfile import file_sha256
from . import BackendError, BackendOptions, InputSpec, logical_device

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cann": "CANNExecutionProvider",
}
#: The PyPI distribution that brings each provider (setup.cfg extras of the same names).
_DISTRIBUTIONS = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu", "cann": "onnxruntime-cann"}
_VISIBLE_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "cann": "ASCEND_RT_VISIBLE_DEVICES"}
_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(float16)": "float16"}

#: What CANN's graph engine accepts as ``precision_mode`` (GE ``CheckPrecisionModeParamValid``,
#: hicann/ge option checks; the CANN EP passes the value through unchecked, so a bad one only
#: fails at the first graph build).
CANN_PRECISION_MODES = (
    "force_fp16", "force_fp32", "cube_fp16in_fp32out", "allow_fp32_to_fp16",
    "must_keep_origin_dtype", "allow_mix_precision", "allow_mix_precision_fp16",
    "allow_mix_precision_bf16", "allow_fp32_to_bf16",
)
#: The CANN EP's documented default (CANN-ExecutionProvider.md, "precision_mode").
CANN_DEFAULT_PRECISION = "force_fp16"
#: Intra-op threads of an accelerator session: they run only what the accelerator lacks.
ACCELERATOR_THREADS = 2


def import_onnxruntime(provider: str) -> ModuleType:
    """The installed ``onnxruntime`` package, or a BackendError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendError(
            f"onnxruntime is not installed: pip install -e '.[{provider}]' "
            f"(brings {_DISTRIBUTIONS[provider]})"
        ) from None
    return onnxruntime


def check_precision(provider: str, precision: str) -> None:
    """``--precision`` is CANN's ``precision_mode``: check it, refuse it where it does nothing."""
    if not precision:
        return
    if provider != "cann":
        raise BackendError(
            f"--precision {precision}: only --provider cann has a precision mode; "
            f"--provider {provider} runs the ONNX's own dtypes (convert with --fp16 for fp16)"
        )
    if precision not in CANN_PRECISION_MODES:
        raise BackendError(
            f"--precision {precision}: not a CANN precision_mode; choose one of "
            f"{', '.join(CANN_PRECISION_MODES)}"
        )


def cann_compile_dir(model: Path, precision: str, device_id: int) -> Path:
    """This chip's CANN working directory for ``model`` compiled at ``precision``."""
    key = f"{file_sha256(model)}-{precision or 'default'}"
    return cache_dir() / "cann-om" / key / f"{socket.gethostname()}-chip{device_id}"


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
        check_precision(options.provider, options.precision)
        ort = import_onnxruntime(options.provider)
        if want not in ort.get_available_providers():
            raise BackendError(
                f"--provider {options.provider}: {want} is not in this onnxruntime build "
                f"(has {', '.join(ort.get_available_providers())}); "
                f"pip install -e '.[{options.provider}]' in place of the current onnxruntime"
            )
        model = Path(model).resolve()
        self._home = None  # the working directory to return to on close (CANN only)
        self._accelerated = options.provider != "cpu"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads starve the preprocessing actors that share the host.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self._accelerated:
            if options.cores:
                os.sched_setaffinity(0, options.cores)
            so.intra_op_num_threads = max(1, options.threads)
            providers: list = [want]
        else:
            so.intra_op_num_threads = max(1, min(options.threads, ACCELERATOR_THREADS))
            # The device actor narrowed the visible devices to its own: that one is logical 0.
            variable = _VISIBLE_ENV[options.provider]
            logical = logical_device(device_id, os.environ.get(variable), variable)
            provider_options: dict[str, str] = {"device_id": str(logical)}
            if options.provider == "cann":
                provider_options["dump_om_model"] = "1"
                if options.precision:
                    provider_options["precision_mode"] = options.precision
                self._enter(cann_compile_dir(model, options.precision, device_id))
            providers = [(want, provider_options), "CPUExecutionProvider"]
        try:
            # enable_fallback=0: keep the accelerator's own error (1.24.4 and 1.32 read it; a
            # release that ignores it falls back, which the provider check below refuses).
            self.session = ort.InferenceSession(str(model), so, providers=providers,
                                                enable_fallback=0)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many private types
            self.close()
            raise BackendError(f"onnxruntime could not load {model}: {_first_line(exc)}") from None
        self.provider = self.session.get_providers()[0]
        if self.provider != want:
            self.close()
            raise BackendError(f"onnxruntime fell back to {self.provider} instead of {want}")
        self.session.disable_fallback()
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
        self.input = InputSpec(inp.name, shape, _DTYPES.get(inp.type, inp.type))
        self.num_classes = int(out.shape[-1])
        self._output = out.name
        self._shapes: set[int] = set()  # batch sizes the accelerator has already run
        self.precision = self._precision(options)

    def _precision(self, options: BackendOptions) -> str:
        """What arithmetic runs, as the host can tell: CANN's graph engine applies its
        precision mode to whatever the ONNX holds; other providers run the ONNX's dtypes."""
        if options.provider == "cann":
            if options.precision:
                return f"{options.precision} (--precision)"
            return f"{CANN_DEFAULT_PRECISION} (CANN EP default)"
        meta = self.session.get_modelmeta().custom_metadata_map
        fallback = "fp16" if self.input.dtype == "float16" else "fp32"
        return f"{meta.get('cardrunner.precision') or fallback} (ONNX)"

    def _enter(self, folder: Path) -> None:
        """Run this (CANN) session in ``folder``: the EP reads and writes its .om files there."""
        folder.mkdir(parents=True, exist_ok=True)
        self._home = os.getcwd()
        os.chdir(folder)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        n = len(batch)
        x = self._shape_stable(batch)
        t0 = time.perf_counter()
        try:
            logits = self.session.run([self._output], {self.input.name: x})[0]
        except Exception as exc:  # noqa: BLE001 - EPFail, Fail, RuntimeException, ...
            raise BackendError(
                f"{self.provider} failed on a batch of {n}: {_first_line(exc)}") from None
        seconds = time.perf_counter() - t0
        self._shapes.add(len(x))
        return np.asarray(logits[:n], dtype=np.float32), seconds

    def _shape_stable(self, batch: np.ndarray) -> np.ndarray:
        """On an accelerator, zero-pad ``batch`` to the smallest batch size already run."""
        n = len(batch)
        fits = [s for s in self._shapes if s > n]
        if not self._accelerated or n in self._shapes or not fits:
            return batch
        padded = np.zeros((min(fits), *batch.shape[1:]), dtype=batch.dtype)
        padded[:n] = batch
        return padded

    def close(self) -> None:
        self.session = None
        if self._home is not None:
            os.chdir(self._home)
            self._home = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
