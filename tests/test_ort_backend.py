"""runner.backends.ort on the CPU runtime and, through tests/fake_ort.py, on CUDA and CANN.

No GPU or Ascend chip is available: the accelerator paths are checked against a fake that
follows onnxruntime's Python session (fallback included) and what the CUDA / CANN providers
do per input shape; they are unverified on hardware.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as real_ort
import pytest

from runner.backends import BackendError, BackendOptions
from runner.backends.ort import CANN_PRECISION_MODES, OrtBackend
from runner.modelfile import file_sha256
from tests.conftest import tiny_classifier
from tests.fake_ort import CPU, FakeOrt

CUDA, CANN = "CUDAExecutionProvider", "CANNExecutionProvider"
SIZE = 8  # a tiny image side keeps the real CPU arithmetic under the fake fast


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return tiny_classifier(tmp_path / "m.onnx", size=SIZE, classes=10)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """CARDRUNNER_CACHE in tmp and a working directory of its own (the CANN EP writes there)."""
    monkeypatch.setenv("CARDRUNNER_CACHE", str(tmp_path / "cache"))
    for var in ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path / "cache"


def install(monkeypatch, *providers: str, devices: int = 2) -> FakeOrt:
    fake = FakeOrt([*providers, CPU], devices=devices)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    return fake


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def cpu_logits(model: Path, x: np.ndarray) -> np.ndarray:
    sess = real_ort.InferenceSession(str(model), providers=[CPU])
    return sess.run(None, {"image": x})[0]


def warm_up(backend: OrtBackend, size: int) -> None:
    """What the device actor does before timing: two batches of the run's batch size."""
    for _ in range(2):
        backend.run(batch(size))


# --------------------------------------------------------------------------- installation


@pytest.mark.parametrize("provider", ["cpu", "cuda", "cann"])
def test_missing_runtime_names_the_extra_to_install(model, monkeypatch, provider):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(BackendError) as err:
        OrtBackend(model, 0, BackendOptions(provider=provider))
    (line,) = str(err.value).splitlines()
    assert f"pip install -e '.[{provider}]'" in line


def test_cpu_build_asked_for_cuda_names_the_extra(model, cache, monkeypatch):
    install(monkeypatch)  # a CPU-only build
    with pytest.raises(BackendError, match=r"CUDAExecutionProvider is not in this onnxruntime "
                                           r"build .*pip install -e '\.\[cuda\]'"):
        OrtBackend(model, 0, BackendOptions(provider="cuda"))


# --------------------------------------------------------------------------- precision


def test_precision_of_an_onnx_comes_from_its_metadata(tmp_path):
    fp32 = tiny_classifier(tmp_path / "a.onnx", size=SIZE, classes=10)
    assert OrtBackend(fp32, 0, BackendOptions()).precision == "fp32 (ONNX)"
    m = onnx.load(str(fp32))
    onnx.helper.set_model_props(m, {"cardrunner.precision": "fp16"})
    onnx.save(m, str(tmp_path / "b.onnx"))
    assert OrtBackend(tmp_path / "b.onnx", 0, BackendOptions()).precision == "fp16 (ONNX)"


def test_unflagged_cann_run_reports_the_eps_force_fp16(model, cache, monkeypatch):
    fake = install(monkeypatch, CANN)
    backend = OrtBackend(model, 0, BackendOptions(provider="cann"))
    assert backend.precision == "force_fp16 (CANN EP default)"
    assert "precision_mode" not in fake.sessions[-1]["options"][CANN]
    backend.close()


def test_cann_precision_flag_is_passed_and_reported(model, cache, monkeypatch):
    fake = install(monkeypatch, CANN)
    backend = OrtBackend(model, 0, BackendOptions(provider="cann", precision="allow_fp32_to_fp16"))
    assert fake.sessions[-1]["options"][CANN]["precision_mode"] == "allow_fp32_to_fp16"
    assert backend.precision == "allow_fp32_to_fp16 (--precision)"
    backend.close()


def test_bad_cann_precision_is_refused_before_any_graph_build(model, cache, monkeypatch):
    fake = install(monkeypatch, CANN)
    with pytest.raises(BackendError) as err:
        OrtBackend(model, 0, BackendOptions(provider="cann", precision="fp16"))
    (line,) = str(err.value).splitlines()
    assert line.startswith("--precision fp16: not a CANN precision_mode; choose one of")
    assert all(mode in line for mode in CANN_PRECISION_MODES)
    assert fake.sessions == [] and fake.events == []
    assert Path.cwd() == cache.parent / "work"


@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_precision_is_refused_where_it_does_nothing(model, cache, monkeypatch, provider):
    install(monkeypatch, CUDA)
    with pytest.raises(BackendError) as err:
        OrtBackend(model, 0, BackendOptions(provider=provider, precision="force_fp16"))
    (line,) = str(err.value).splitlines()
    assert line.startswith("--precision force_fp16: only --provider cann has a precision mode")


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize(("provider", "name"), [("cuda", CUDA), ("cann", CANN)])
def test_provider_failing_mid_run_fails_the_batch_instead_of_running_on_cpu(
    model, cache, monkeypatch, provider, name
):
    fake = install(monkeypatch, name)
    backend = OrtBackend(model, 0, BackendOptions(provider=provider))
    warm_up(backend, 4)
    fake.fail_on_run = 3
    with pytest.raises(BackendError) as err:
        backend.run(batch(4))
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{name} failed on a batch of 4: ")
    # No session was ever rebuilt on the CPU provider behind the report's back.
    assert all(s["providers"][0] == name for s in fake.sessions)
    assert backend.provider == name
    backend.close()


def test_session_that_cannot_use_the_chip_is_refused(model, cache, monkeypatch):
    fake = install(monkeypatch, CUDA, devices=1)
    with pytest.raises(BackendError, match="onnxruntime could not load .*Invalid device ID: 3"):
        OrtBackend(model, 3, BackendOptions(provider="cuda"))
    assert all(s["providers"][0] == CUDA for s in fake.sessions)


def test_cann_reads_its_visible_list_only_up_to_the_first_space(model, cache, monkeypatch):
    """CANN parses ASCEND_RT_VISIBLE_DEVICES="1, 3" as chip 1 alone; before, chip 3 was handed
    to the EP as logical 1, and the fake's two chips accepted it."""
    fake = install(monkeypatch, CANN)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1, 3")
    with pytest.raises(BackendError, match=r"ASCEND_RT_VISIBLE_DEVICES='1, 3': .* \['1'\]; chip 3"):
        OrtBackend(model, 3, BackendOptions(provider="cann"))
    assert fake.sessions == []
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1,3")
    OrtBackend(model, 3, BackendOptions(provider="cann")).close()
    assert fake.sessions[-1]["options"][CANN]["device_id"] == "1"


@pytest.mark.parametrize("visible", ["GPU-2c9a07", "3"])
def test_cuda_device_narrowed_by_the_actor_is_logical_zero(model, cache, monkeypatch, visible):
    """The device actor sets CUDA_VISIBLE_DEVICES to its one GPU, a number or a UUID."""
    fake = install(monkeypatch, CUDA, devices=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    OrtBackend(model, 3, BackendOptions(provider="cuda")).close()
    assert fake.sessions[-1]["options"][CUDA]["device_id"] == "0"


# --------------------------------------------------------------------------- compiles


@pytest.mark.parametrize(("provider", "name", "setup"),
                         [("cann", CANN, "compile"), ("cuda", CUDA, "algo-search")])
def test_short_batches_reuse_the_warm_up_shape(model, cache, monkeypatch, provider, name, setup):
    fake = install(monkeypatch, name)
    backend = OrtBackend(model, 0, BackendOptions(provider=provider))
    warm_up(backend, 4)
    assert [(e.kind, e.batch) for e in fake.events] == [(setup, 4)]
    for n in (3, 1):  # the last batch of a shard, one shortened by decode errors
        x = batch(n, seed=n)
        logits, _ = backend.run(x)
        np.testing.assert_allclose(logits, cpu_logits(model, x), rtol=1e-5, atol=1e-5)
    assert [(e.kind, e.batch) for e in fake.events] == [(setup, 4)]  # nothing new timed
    backend.close()


def test_cpu_batches_are_not_padded(model):
    backend = OrtBackend(model, 0, BackendOptions())
    warm_up(backend, 4)
    x = batch(3)
    logits, _ = backend.run(x)
    assert logits.shape == (3, 10)
    np.testing.assert_allclose(logits, cpu_logits(model, x), rtol=1e-5, atol=1e-5)


def test_cann_graphs_are_cached_per_model_content_precision_and_chip(
    model, cache, monkeypatch, tmp_path
):
    fake = install(monkeypatch, CANN)
    work = Path.cwd()

    def run_once(device: int, precision: str = "") -> None:
        backend = OrtBackend(model, device, BackendOptions(provider="cann", precision=precision))
        warm_up(backend, 2)
        backend.close()
        assert Path.cwd() == work

    run_once(0)
    run_once(1)  # another chip on this host: its own file, never the same one
    run_once(0)  # the same model again on chip 0: its graph is reused
    run_once(0, "force_fp32")  # another precision mode: compiled anew
    tiny_classifier(model, size=SIZE, classes=10, seed=7)  # re-exported at the same path
    run_once(0)

    kinds = [(e.kind, e.stale) for e in fake.events]
    assert kinds == [("compile", False), ("compile", False), ("load", False),
                     ("compile", False), ("compile", False)]
    paths = [Path(e.path) for e in fake.events]
    assert len({paths[0], paths[1], paths[3], paths[4]}) == 4
    assert paths[2] == paths[0]
    host = socket.gethostname()
    assert paths[4].parent == cache / "cann-om" / f"{file_sha256(model)}-default" / f"{host}-chip0"
    assert paths[3].parent.parent.name.endswith("-force_fp32")
    assert not list(work.iterdir())  # nothing in the working directory


# --------------------------------------------------------------------------- threads


def test_accelerator_sessions_get_a_small_pool_that_does_not_spin(model, cache, monkeypatch):
    fake = install(monkeypatch, CUDA)
    OrtBackend(model, 0, BackendOptions(provider="cuda", threads=8)).close()
    so = fake.sessions[-1]["sess_options"]
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_cpu_sessions_keep_their_share_of_the_cores(model, cache, monkeypatch):
    fake = install(monkeypatch)
    OrtBackend(model, 0, BackendOptions(threads=3)).close()
    assert fake.sessions[-1]["sess_options"].intra_op_num_threads == 3
    assert os.getcwd() == str(cache.parent / "work")
