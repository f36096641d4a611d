"""The pyACL path of runner.backends.acl on the hosts and CANN versions it may meet (issue 16).

Each test names the defect of the first version of the backend that it catches.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runner.backends import BackendError, BackendOptions
from runner.backends.acl import DEFAULT_PRECISION, AclBackend
from runner.backends.acl_devices import cann_visible_ids, place
from runner.backends.acl_pyacl import MIN_CANN
from tests.fake_acl import ACL_DEVICE, D2D, FakeAcl, FakeOm, expected, images, om_files

OPTS = BackendOptions()
BS16 = FakeOm(batch=16)


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


def on_another_thread(fn, *args):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def test_opened_on_one_thread_run_and_closed_on_others(env, tmp_path):
    """The device actor runs calls on a pool of threads; a context is current per thread."""
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    logits, seconds = on_another_thread(backend.run, images(5, BS16))  # padded to 16
    np.testing.assert_array_equal(logits, expected(5, BS16.classes))
    assert seconds > 0
    on_another_thread(backend.close)
    assert fake.leaks() == []


def test_runtime_that_ignores_visible_devices_gets_the_physical_id(env, tmp_path):
    """Issue 16 item 4: a runtime without ASCEND_RT_VISIBLE_DEVICES numbers chips physically;
    set_device(0) would silently run on chip 0."""
    env.setenv("ASCEND_RT_VISIBLE_DEVICES", "3")
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry, reads_visible=False)
    backend = AclBackend(next(iter(registry)), 3, OPTS)
    assert fake.opened_chips == [3] and backend.logical_id == 3
    assert "ignores ASCEND_RT_VISIBLE_DEVICES=3" in backend.placement.note
    backend.close()


def test_visible_list_is_read_the_way_cann_reads_it(env, tmp_path):
    """Item 4: CANN stops at the first space, so "1, 3" makes only chip 1 visible."""
    env.setenv("ASCEND_RT_VISIBLE_DEVICES", "1, 3")
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    with pytest.raises(BackendError) as err:
        AclBackend(next(iter(registry)), 3, OPTS)
    assert str(err.value) == (
        "ASCEND_RT_VISIBLE_DEVICES='1, 3': CANN reads [1] (ascending ids up to the first "
        "character that is not a digit or comma) and the runtime sees 1 chip(s); "
        "chip 3 is not among them"
    )
    assert fake.opened_chips == [] and fake.leaks() == []
    backend = AclBackend(next(iter(registry)), 1, OPTS)
    assert fake.opened_chips == [1] and backend.logical_id == 0
    backend.close()


def test_chip_the_runtime_does_not_have_is_a_clear_error(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry, chips=4)
    with pytest.raises(BackendError, match=r"^device 5: the runtime sees 4 Ascend chip\(s\)$"):
        AclBackend(next(iter(registry)), 5, OPTS)
    assert "acl.rt.set_device" not in fake.names() and fake.leaks() == []


def test_place_and_cann_visible_ids():
    assert cann_visible_ids("1,2,3") == [1, 2, 3]
    assert cann_visible_ids("1, 2,3") == [1]
    assert cann_visible_ids("1,,2") == [1] and cann_visible_ids(" 1") == []
    assert place(2, None, 4).runtime_id == 2
    assert place(3, "2,3", 2).runtime_id == 1  # the runtime read the list
    assert place(3, "2,3", 8).runtime_id == 3  # it did not: 8 > 2 listed
    assert place(3, "1,3,9", 2).runtime_id == 1  # 9 is no chip: CANN stops there
    assert place(3, "2", None).runtime_id == 0  # Ray's pick, first listed
    with pytest.raises(BackendError, match="chip 9 is not among them"):
        place(9, "1,3,9", 2)


def test_import_error_text_and_minimum_cann_are_in_the_message(env, tmp_path):
    """Item 5: on Python 3.10+ with CANN 5.x/6.0, `import acl` fails though set_env.sh was
    sourced; the message must say why, not only tell the user to source it."""
    env.setitem(sys.modules, "acl", None)
    registry = om_files(tmp_path, m_bs16=BS16)
    with pytest.raises(BackendError) as err:
        AclBackend(next(iter(registry)), 0, OPTS)
    message = str(err.value)
    assert "(import of acl halted; None in sys.modules)" in message
    assert f"CANN {MIN_CANN} or newer" in message and "numpy < 2" in message
    assert f"lists Python {sys.version_info.major}.{sys.version_info.minor}" in message


def test_acl_initialised_by_another_library_is_used_and_not_finalized(env, tmp_path):
    """Item 6: acl.init returns ACL_ERROR_REPEAT_INITIALIZE when a co-resident library
    initialised ACL; that ACL is not ours to finalize."""
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry, initialised_elsewhere=True)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    np.testing.assert_array_equal(backend.run(images(2, BS16))[0], expected(2, BS16.classes))
    backend.close()
    assert "acl.finalize" not in fake.names() and fake.initialised
    assert fake.leaks() == []


def test_two_backends_in_one_process_share_one_init(env, tmp_path):
    """Item 6: acl.init once per process (CANN 5.0.4); the first close must not finalize the
    ACL the second backend still uses."""
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry)
    first = AclBackend(next(iter(registry)), 0, OPTS)
    second = AclBackend(next(iter(registry)), 1, OPTS)
    first.close()
    assert "acl.finalize" not in fake.names()
    np.testing.assert_array_equal(second.run(images(3, BS16))[0], expected(3, BS16.classes))
    second.close()
    assert fake.names().count("acl.init") == 1 and fake.names()[-1] == "acl.finalize"
    assert fake.leaks() == []


def test_int32_output_is_refused(env, tmp_path):
    """Item 7: a 4-byte INT32 output has the size of float32 logits; its type says otherwise."""
    registry = om_files(tmp_path, m_bs16=FakeOm(16, out_dtype="int32"))
    fake = install(env, registry)
    with pytest.raises(BackendError) as err:
        AclBackend(next(iter(registry)), 0, OPTS)
    assert str(err.value) == "m_bs16.om: output 0 is int32; expected float32 or float16 logits"
    assert fake.leaks() == []


@pytest.mark.parametrize("util_api", ["bytes", "numpy"])
def test_float16_logits_are_read_as_float16(env, tmp_path, util_api):
    """Item 7: ATC --output_type=FP16 gives 2-byte logits, returned as float32."""
    registry = om_files(tmp_path, m_bs16=FakeOm(16, out_dtype="float16"))
    install(env, registry, util_api=util_api)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    logits, _ = backend.run(images(4, BS16))
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, expected(4, BS16.classes))
    backend.close()


def test_program_running_on_the_device_copies_device_to_device(env, tmp_path):
    """Item 8: acllite_model.py copies device-to-device when get_run_mode is ACL_DEVICE."""
    registry = om_files(tmp_path, m_bs16=BS16)
    fake = install(env, registry, run_mode=ACL_DEVICE)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    np.testing.assert_array_equal(backend.run(images(3, BS16))[0], expected(3, BS16.classes))
    assert [args[4] for args in fake.args("acl.rt.memcpy")] == [D2D, D2D]
    backend.close()


def test_precision_comes_from_the_manifest(env, tmp_path):
    registry = om_files(tmp_path, x_bs16=BS16)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({"models": {"16": "x_bs16.om"}, "precision": "allow_mix_precision"})
    )
    install(env, registry)
    backend = AclBackend(manifest, 0, OPTS)
    assert backend.precision == "allow_mix_precision (ATC)"
    backend.close()
    backend = AclBackend(tmp_path / "x_bs16.om", 0, OPTS)
    assert backend.precision == DEFAULT_PRECISION == "set at ATC time (default force_fp16)"
    backend.close()
