"""A provider-shaped fake of the ``onnxruntime`` package: CUDA and CANN sessions without a chip.

No GPU or Ascend chip is available to the tests, so ``runner.backends.ort`` is checked against
``monkeypatch.setitem(sys.modules, "onnxruntime", FakeOrt([...providers]))``.  The arithmetic
is the real CPU onnxruntime's; around it the fake does what the real package does
(microsoft/onnxruntime, python/onnxruntime_inference_collection.py, as in 1.24.4 and 1.32):

* ``InferenceSession(path, sess_options, providers=..., **kwargs)``: ``enable_fallback``
  (kwarg, default 1); a session whose creation fails (``ValueError``/``RuntimeError``) is
  re-created on ``["CPUExecutionProvider"]`` when fallback is on, and fallback is then off.
* ``run()``: an ``EPFail`` with fallback on prints, re-creates the session on
  ``["CPUExecutionProvider"]``, disables fallback and runs again; ``disable_fallback()``
  makes it raise instead.

and what the accelerator providers do:

* CANN (onnxruntime-cann 1.24.4, cann_execution_provider.cc ``Compile``, cann_graph.cc
  ``BuildONNXModel``): provider options are parsed strictly ("Unknown provider option");
  on the first run of an input shape it loads ``<node>_<hash of the shape>.om`` from the
  working directory when that file exists, else compiles (``precision_mode`` is checked then,
  as GE does) and writes it when ``dump_om_model`` (default true); ``<node>`` hashes the
  model's *path* (framework/model_metadef_id_generator.cc).  The .om records what it was
  compiled from, so a load of a graph built from other bytes or another precision is
  recorded as stale.
* CUDA: the first run of an input shape is a cuDNN algorithm search (EXHAUSTIVE by default,
  cuda_execution_provider_info.h).

Every shape setup is recorded in ``fake.events``; ``fake.sessions`` keeps each session's
providers and options; ``fake.fail_on_run = k`` makes the accelerator's k-th run raise
``EPFail``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as real_ort

CPU = "CPUExecutionProvider"
CANN_OPTIONS = {"device_id", "npu_mem_limit", "arena_extend_strategy", "enable_cann_graph",
                "enable_cann_subgraph", "dump_graphs", "dump_om_model", "precision_mode",
                "op_select_impl_mode", "optypelist_for_implmode"}
CUDA_OPTIONS = {"device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
                "do_copy_in_default_stream", "cudnn_conv_use_max_workspace", "enable_cuda_graph"}
#: GE's CheckPrecisionModeParamValid set, "" included (no option given).
GE_PRECISION_MODES = {"", "force_fp16", "force_fp32", "cube_fp16in_fp32out", "allow_fp32_to_fp16",
                      "must_keep_origin_dtype", "allow_mix_precision", "allow_mix_precision_fp16",
                      "allow_mix_precision_bf16", "allow_fp32_to_bf16"}


class EPFail(RuntimeError):
    """onnxruntime.capi.onnxruntime_pybind11_state.EPFail."""


@dataclass
class Event:
    """One first run of an input shape on an accelerator."""

    kind: str  # "compile" | "load" (CANN .om) | "algo-search" (CUDA)
    provider: str
    batch: int
    path: str = ""  # the .om, for CANN
    stale: bool = False  # a loaded .om built from other model bytes or another precision


def _parse_bool(value: str) -> bool:
    # ProviderOptionsParser: ParseStringWithClassicLocale into a bool.
    if value in ("1", "true", "True"):
        return True
    if value in ("0", "false", "False"):
        return False
    raise RuntimeError(f'Failed to parse value: "{value}"')


class FakeOrt:
    """The ``onnxruntime`` module as far as runner.backends.ort uses it."""

    SessionOptions = real_ort.SessionOptions
    ExecutionMode = real_ort.ExecutionMode

    def __init__(self, providers: list[str], devices: int = 1) -> None:
        self.available = list(providers)
        self.devices = devices
        self.events: list[Event] = []
        self.sessions: list[dict[str, Any]] = []
        self.fail_on_run: int | None = None
        self.accelerator_runs = 0
        fake = self

        class InferenceSession(_Session):
            def __init__(self, path, sess_options=None, providers=None, provider_options=None,
                         **kwargs):
                super().__init__(fake, path, sess_options, providers, kwargs)

        self.InferenceSession = InferenceSession

    def get_available_providers(self) -> list[str]:
        return list(self.available)


class _Session:
    def __init__(self, fake: FakeOrt, path, sess_options, providers, kwargs) -> None:
        self._fake = fake
        self._path = os.fspath(path)
        self._sess_options = sess_options
        self._enable_fallback = int(kwargs.get("enable_fallback", 1)) == 1
        try:
            self._create(providers)
        except (ValueError, RuntimeError) as exc:
            if not self._enable_fallback:
                raise
            print(f"EP Error {exc} when using {providers}")
            print(f"Falling back to {[CPU]} and retrying.")
            self._create([CPU])
            self.disable_fallback()

    def _create(self, providers) -> None:
        names, options = [], []
        for p in providers or []:
            name, opts = p if isinstance(p, tuple) else (p, {})
            names.append(name)
            options.append({str(k): str(v) for k, v in opts.items()})
        for name, opts in zip(names, options, strict=True):
            if name not in self._fake.available:
                raise ValueError(f"{name} is not available")
            known = {"CANNExecutionProvider": CANN_OPTIONS,
                     "CUDAExecutionProvider": CUDA_OPTIONS}.get(name, set())
            for key in opts:
                if key not in known:
                    raise RuntimeError(f'Unknown provider option: "{key}".')
            if "device_id" in opts and not 0 <= int(opts["device_id"]) < self._fake.devices:
                raise RuntimeError(f"Invalid device ID: {opts['device_id']}")
            if "dump_om_model" in opts:
                _parse_bool(opts["dump_om_model"])
        self._providers = names
        self._options = dict(zip(names, options, strict=True))
        self._cpu = real_ort.InferenceSession(self._path, self._sess_options, providers=[CPU])
        self._seen: set[tuple[int, ...]] = set()
        self._fake.sessions.append({"providers": list(names), "options": self._options,
                                    "cwd": os.getcwd(), "sess_options": self._sess_options})

    # ---- the Session API (onnxruntime_inference_collection.Session)
    def get_providers(self) -> list[str]:
        return list(self._providers)

    def get_inputs(self):
        return self._cpu.get_inputs()

    def get_outputs(self):
        return self._cpu.get_outputs()

    def get_modelmeta(self):
        return self._cpu.get_modelmeta()

    def disable_fallback(self) -> None:
        self._enable_fallback = False

    def enable_fallback(self) -> None:
        self._enable_fallback = True

    def set_providers(self, providers=None, provider_options=None) -> None:
        self._create(providers)

    def run(self, output_names, input_feed, run_options=None):
        try:
            return self._run(output_names, input_feed, run_options)
        except EPFail as err:
            if self._enable_fallback:
                print(f"EP Error: {err!s} using {self._providers}")
                print(f"Falling back to {[CPU]} and retrying.")
                self.set_providers([CPU])
                self.disable_fallback()
                return self._run(output_names, input_feed, run_options)
            raise

    # ---- what the providers do
    def _run(self, output_names, input_feed, run_options):
        provider = self._providers[0]
        if provider != CPU:
            self._fake.accelerator_runs += 1
            if self._fake.accelerator_runs == self._fake.fail_on_run:
                raise EPFail(f"{provider}: device error on run {self._fake.accelerator_runs}")
            shape = tuple(next(iter(input_feed.values())).shape)
            if shape not in self._seen:
                self._seen.add(shape)
                self._fake.events.append(self._first_sight(provider, shape))
        return self._cpu.run(output_names, input_feed, run_options)

    def _first_sight(self, provider: str, shape: tuple[int, ...]) -> Event:
        if provider != "CANNExecutionProvider":
            return Event("algo-search", provider, shape[0])
        opts = self._options[provider]
        node = f"graph_{_hash(str(Path(self._path)))}_0"
        om = Path(f"{node}_{_hash(','.join(map(str, shape)))}.om")  # relative: the cwd
        built_from = {"model_sha256": hashlib.sha256(Path(self._path).read_bytes()).hexdigest(),
                      "precision_mode": opts.get("precision_mode", "")}
        if om.exists():
            stale = json.loads(om.read_text()) != built_from
            return Event("load", provider, shape[0], str(om.resolve()), stale)
        if built_from["precision_mode"] not in GE_PRECISION_MODES:
            raise RuntimeError("E10001: Value [precision_mode] for parameter "
                               "[ge.exec.precision_mode] is invalid.")
        if _parse_bool(opts.get("dump_om_model", "1")):
            om.write_text(json.dumps(built_from))
        return Event("compile", provider, shape[0], str(om.resolve()))


def _hash(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()[:12]
