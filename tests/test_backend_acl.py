"""runner.backends.acl against the recording fake in tests/fake_acl.py (no Ascend chip)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from runner.backends import BackendError, BackendOptions, logical_device, open_backend
from runner.backends.acl import AclBackend, plan_slices
from tests.fake_acl import (
    D2H,
    H2D,
    FakeAcl,
    FakeOm,
    expected,
    fake_logits,
    images,
    om_files,
)

OPTS = BackendOptions()


@pytest.fixture
def env(monkeypatch):
    """No ais_bench, no ASCEND_RT_VISIBLE_DEVICES: the pyACL path on the physical id."""
    monkeypatch.setitem(sys.modules, "ais_bench", None)
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def install(env, registry, **kwargs) -> FakeAcl:
    fake = FakeAcl(registry, **kwargs)
    env.setitem(sys.modules, "acl", fake)
    return fake


BS16 = FakeOm(batch=16)
BS1 = FakeOm(batch=1)


def test_exact_call_sequence_for_load_one_batch_and_teardown(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    logits, seconds = backend.run(images(16, BS16))
    backend.close()
    assert fake.names() == [
        "acl.init",
        "acl.rt.get_device_count",
        "acl.rt.set_device",
        "acl.rt.create_context",
        "acl.rt.get_run_mode",
        "acl.mdl.load_from_file",
        "acl.mdl.create_desc",
        "acl.mdl.get_desc",
        "acl.mdl.get_num_inputs",
        "acl.mdl.get_num_outputs",
        "acl.mdl.get_input_size_by_index",
        "acl.mdl.get_input_dims",
        "acl.mdl.get_output_size_by_index",
        "acl.mdl.get_output_dims",
        "acl.mdl.get_input_data_type",
        "acl.mdl.get_output_data_type",
        "acl.rt.malloc",
        "acl.rt.malloc",
        "acl.rt.malloc_host",
        "acl.mdl.create_dataset",
        "acl.create_data_buffer",
        "acl.mdl.add_dataset_buffer",
        "acl.mdl.create_dataset",
        "acl.create_data_buffer",
        "acl.mdl.add_dataset_buffer",
        # one batch
        "acl.rt.set_context",
        "acl.util.bytes_to_ptr",
        "acl.rt.memcpy",
        "acl.mdl.execute",
        "acl.rt.memcpy",
        "acl.util.ptr_to_bytes",
        # teardown, the reverse of acquisition
        "acl.rt.set_context",
        "acl.destroy_data_buffer",
        "acl.mdl.destroy_dataset",
        "acl.destroy_data_buffer",
        "acl.mdl.destroy_dataset",
        "acl.rt.free_host",
        "acl.rt.free",
        "acl.rt.free",
        "acl.mdl.destroy_desc",
        "acl.mdl.unload",
        "acl.rt.destroy_context",
        "acl.rt.reset_device",
        "acl.finalize",
    ]
    assert fake.args("acl.rt.set_device") == [(0,)] == fake.args("acl.rt.reset_device")
    assert fake.args("acl.mdl.load_from_file") == [(next(iter(registry)),)]
    assert fake.leaks() == []
    np.testing.assert_array_equal(logits, expected(16, BS16.classes))
    assert logits.dtype == np.float32 and seconds >= 0
    assert (backend.name, backend.provider, backend.emulated) == ("acl", "pyacl", False)
    assert backend.input.shape == (-1, 3, 4, 4) and backend.input.dtype == "float32"
    assert backend.input.name == "image" and backend.num_classes == BS16.classes


def test_sizes_match_shapes_and_h2d_copies_the_padded_batch(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    batch = images(5, BS16)
    logits, _ = backend.run(batch)

    in_size, out_size = 16 * 3 * 4 * 4 * 4, 16 * BS16.classes * 4
    assert fake.args("acl.rt.malloc") == [(in_size, 0), (out_size, 0)]
    assert fake.args("acl.rt.malloc_host") == [(out_size,)]
    (h2d,), (d2h,) = ([a for a in fake.args("acl.rt.memcpy") if a[4] == k] for k in (H2D, D2H))
    assert h2d[1] == h2d[3] == in_size and d2h[1] == d2h[3] == out_size
    padded = np.concatenate([batch, np.zeros((11, 3, 4, 4), np.float32)])
    assert bytes(fake.memory[h2d[0]]) == padded.tobytes()  # the device input buffer
    np.testing.assert_array_equal(fake.executed[0][1], padded)
    # 5 rows: the padding's outputs are dropped
    np.testing.assert_array_equal(logits, expected(5, BS16.classes))
    backend.close()
    assert fake.leaks() == []


def test_rows_map_to_their_images(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    install(env, registry)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    batch = np.random.default_rng(0).random((16, 3, 4, 4), dtype=np.float32)
    logits, _ = backend.run(batch)
    np.testing.assert_allclose(logits, fake_logits(batch, BS16.classes), rtol=1e-6)
    logits, _ = backend.run(batch[::-1].copy())
    np.testing.assert_allclose(logits, fake_logits(batch, BS16.classes)[::-1], rtol=1e-6)
    backend.close()


def test_picks_the_om_whose_batch_fits(env, tmp_path):
    registry = om_files(tmp_path, m_bs1=BS1, m_bs16=BS16)
    bs1_path, bs16_path = registry
    fake = install(env, registry)
    backend = open_backend("acl", {1: bs1_path, 16: bs16_path}, 0, OPTS)
    assert backend.batch_sizes == (1, 16)

    logits, _ = backend.run(images(1, BS1))
    assert [path for path, _ in fake.executed] == [bs1_path]
    np.testing.assert_array_equal(logits, expected(1, BS1.classes))

    fake.executed.clear()
    logits, _ = backend.run(images(20, BS16))  # 16, then 4 padded onto the bs16 .om
    assert [path for path, _ in fake.executed] == [bs16_path, bs16_path]
    np.testing.assert_array_equal(logits, expected(20, BS16.classes))
    backend.close()
    assert fake.leaks() == []


def test_batches_larger_than_every_om_run_in_slices(env, tmp_path):
    registry = om_files(tmp_path, m_bs1=BS1, m_bs4=FakeOm(batch=4))
    fake = install(env, registry)
    backend = AclBackend(dict(zip((1, 4), registry, strict=True)), 0, OPTS)
    logits, _ = backend.run(images(9, BS1))
    assert [len(batch) for _, batch in fake.executed] == [4, 4, 1]
    np.testing.assert_array_equal(logits, expected(9, BS1.classes))
    assert backend.run(images(0, BS1))[0].shape == (0, BS1.classes)
    backend.close()


def test_plan_slices():
    assert plan_slices(1, (1, 16)) == [(0, 1, 1)]
    assert plan_slices(5, (1, 16)) == [(0, 5, 16)]
    assert plan_slices(33, (16,)) == [(0, 16, 16), (16, 32, 16), (32, 33, 16)]
    assert plan_slices(0, (16,)) == []


def test_older_cann_numpy_pointer_api(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry, util_api="numpy")
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    logits, _ = backend.run(images(3, BS16))
    np.testing.assert_array_equal(logits, expected(3, BS16.classes))
    assert "acl.util.numpy_to_ptr" in fake.names() and "acl.util.ptr_to_numpy" in fake.names()
    backend.close()


@pytest.mark.parametrize(
    ("visible", "device_id", "logical"),
    [(None, 2, 2), ("3", 3, 0), ("2,3", 3, 1), ("2", 3, 0)],
)
def test_ascend_rt_visible_devices(env, tmp_path, visible, device_id, logical):
    """A chip not in the list (Ray's pick differs) means the first listed one, as before."""
    if visible is not None:
        env.setenv("ASCEND_RT_VISIBLE_DEVICES", visible)
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    backend = AclBackend(next(iter(registry)), device_id, OPTS)
    assert (backend.physical_id, backend.logical_id) == (device_id, logical)
    assert fake.args("acl.rt.set_device") == [(logical,)]
    assert fake.args("acl.rt.create_context") == [(logical,)]
    chip = device_id if visible is None or str(device_id) in visible else int(visible)
    assert fake.opened_chips == [chip]
    backend.close()


def test_logical_device():
    npu, cuda = "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"
    assert logical_device(3, None, npu) == 3
    assert logical_device(3, "", npu) == 3
    assert logical_device(3, "1,3", npu) == 1
    assert logical_device(3, "1, 3", cuda) == 1
    assert logical_device(1, "GPU-2c9a07", cuda) == 0  # the actor narrowed it to a UUID


@pytest.mark.parametrize("visible", ["1, 3", "6"])
def test_logical_device_never_falls_back_to_another_chip(visible):
    """CANN stops reading at the first space: "1, 3" shows it chip 1 only, so chip 3 is not
    logical 1 (before: 1, chip 1 driven); a list without the chip is not its first entry."""
    with pytest.raises(BackendError, match="ASCEND_RT_VISIBLE_DEVICES=.*chip 3 is not among"):
        logical_device(3, visible, "ASCEND_RT_VISIBLE_DEVICES")


def test_execute_error_is_one_line_and_close_still_releases(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    fake.fail["acl.mdl.execute"] = 507011
    with pytest.raises(BackendError) as err:
        backend.run(images(2, BS16))
    assert str(err.value) == "acl.mdl.execute returned 507011 (device 0, model m_bs16.om)"
    backend.close()
    assert fake.names()[-3:] == ["acl.rt.destroy_context", "acl.rt.reset_device", "acl.finalize"]
    assert fake.leaks() == []
    with pytest.raises(BackendError, match="after close"):
        backend.run(images(2, BS16))


def test_error_message_names_visible_devices(env, tmp_path):
    env.setenv("ASCEND_RT_VISIBLE_DEVICES", "3")
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    fake.fail["acl.rt.set_device"] = 107001
    with pytest.raises(BackendError) as err:
        AclBackend(next(iter(registry)), 3, OPTS)
    assert str(err.value) == (
        "acl.rt.set_device returned 107001 (device 0 of ASCEND_RT_VISIBLE_DEVICES=3)"
    )
    assert fake.names()[-1] == "acl.finalize" and fake.leaks() == []


@pytest.mark.parametrize(
    "call",
    ["acl.rt.malloc", "acl.mdl.create_desc", "acl.mdl.add_dataset_buffer", "acl.mdl.get_desc"],
)
def test_load_error_tears_down_what_was_acquired(env, tmp_path, call):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    fake.fail[call] = 100000
    with pytest.raises(BackendError) as err:
        AclBackend(next(iter(registry)), 0, OPTS)
    assert str(err.value).startswith(f"{call} returned ")
    assert str(err.value).endswith("(device 0, model m_bs16.om)")
    assert "\n" not in str(err.value)
    after = fake.names()[fake.names().index(call) + 1 :]
    assert after[-3:] == ["acl.rt.destroy_context", "acl.rt.reset_device", "acl.finalize"]
    assert "acl.mdl.unload" in after
    assert fake.leaks() == []


def test_teardown_error_does_not_mask_the_first_error(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    fake.fail["acl.mdl.load_from_file"] = 145000
    fake.fail["acl.rt.destroy_context"] = 107002
    with pytest.raises(BackendError, match=r"^acl\.mdl\.load_from_file returned 145000 "):
        AclBackend(next(iter(registry)), 0, OPTS)
    assert fake.names()[-2:] == ["acl.rt.reset_device", "acl.finalize"]


def test_close_releases_everything_and_reports_the_first_failure(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    fake.fail["acl.rt.free"] = 107003
    fake.fail["acl.mdl.unload"] = 148047
    with pytest.raises(BackendError, match=r"^acl\.rt\.free returned 107003 "):
        backend.close()
    assert fake.names()[-1] == "acl.finalize"
    assert fake.leaks() == ["device memory", "device memory", "model"]
    backend.close()  # a second close does nothing
    assert fake.names()[-1] == "acl.finalize"


def test_missing_acl_gives_the_clear_error(env, tmp_path):
    env.setitem(sys.modules, "acl", None)
    registry = om_files(tmp_path, m_bs16=BS16)
    with pytest.raises(BackendError) as err:
        AclBackend(next(iter(registry)), 0, OPTS)
    message = str(err.value)
    assert message.startswith("acl backend needs CANN's pyACL and `import acl` failed (")
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in message
    assert "\n" not in message


def test_missing_model_file_fails_before_touching_the_runtime(env, tmp_path):
    fake = install(env, {})
    with pytest.raises(BackendError, match="not found"):
        AclBackend(tmp_path / "absent.om", 0, OPTS)
    assert fake.calls == []


def test_manifest_with_aipp_uint8_input(env, tmp_path):
    nhwc = {"image": (4, 4, 3), "dtype": "uint8"}
    registry = om_files(tmp_path, x_bs1=FakeOm(1, **nhwc), x_bs16=FakeOm(16, **nhwc))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "models": {"1": "x_bs1.om", "16": "x_bs16.om"},
                "input": {
                    "name": "image",
                    "dtype": "uint8",
                    "layout": "NHWC",
                    "shape": [-1, 4, 4, 3],
                },
            }
        )
    )
    fake = install(env, registry)
    backend = AclBackend(manifest, 0, OPTS)
    assert backend.input.dtype == "uint8" and backend.input.layout == "NHWC"
    assert backend.input.shape == (-1, 4, 4, 3) and backend.input.layout == "NHWC"
    assert backend.batch_sizes == (1, 16)
    batch = images(3, FakeOm(16, **nhwc))
    logits, _ = backend.run(batch)
    np.testing.assert_array_equal(logits, expected(3, 5))
    assert fake.executed[0][1].dtype == np.uint8
    with pytest.raises(BackendError, match=r"expected a uint8 NHWC batch of shape \(n, 4, 4, 3\)"):
        backend.run(batch.astype(np.float32))
    backend.close()


def test_manifest_that_disagrees_with_the_model(env, tmp_path):
    registry = om_files(tmp_path, x_bs16=BS16)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": {"16": "x_bs16.om"}, "input": {"dtype": "uint8"}}))
    fake = install(env, registry)
    with pytest.raises(
        BackendError, match="manifest says input dtype uint8, the model takes float32"
    ):
        AclBackend(manifest, 0, OPTS)
    assert fake.leaks() == []


def test_manifest_shape_that_disagrees_with_the_model(env, tmp_path):
    registry = om_files(tmp_path, x_bs16=BS16)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({"models": {"16": "x_bs16.om"}, "input": {"shape": [-1, 3, 300, 300]}})
    )
    install(env, registry)
    with pytest.raises(BackendError) as err:
        AclBackend(manifest, 0, OPTS)
    assert str(err.value) == (
        "x_bs16.om: the manifest says input shape [-1, 3, 300, 300], the model takes [16, 3, 4, 4]"
    )


def test_bad_manifest(env, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    with pytest.raises(BackendError, match="not a convert.onnx2om manifest"):
        AclBackend(manifest, 0, OPTS)


def test_dict_entry_whose_om_has_another_batch(env, tmp_path):
    registry = om_files(tmp_path, m_bs1=BS1)
    fake = install(env, registry)
    with pytest.raises(BackendError, match="listed for batch size 16, its input has 1"):
        AclBackend({16: next(iter(registry))}, 0, OPTS)
    assert fake.leaks() == []


def test_batch_with_wrong_shape_or_dtype(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    calls = len(fake.calls)
    with pytest.raises(BackendError) as err:
        backend.run(np.zeros((2, 3, 5, 5), np.float32))
    assert str(err.value) == (
        "acl backend: expected a float32 NCHW batch of shape (n, 3, 4, 4), got float32 (2, 3, 5, 5)"
    )
    with pytest.raises(BackendError, match="got float64"):
        backend.run(np.zeros((2, 3, 4, 4)))
    assert len(fake.calls) == calls
    backend.close()


def test_oms_from_different_models_are_refused(env, tmp_path):
    registry = om_files(tmp_path, a_bs1=BS1, b_bs16=FakeOm(16, classes=7))
    fake = install(env, registry)
    with pytest.raises(BackendError, match="all .om files must come from one model"):
        AclBackend(dict(zip((1, 16), registry, strict=True)), 0, OPTS)
    assert fake.names()[-1] == "acl.finalize" and fake.leaks() == []
