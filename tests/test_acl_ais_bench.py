"""The ais_bench path of runner.backends.acl against every ais_bench generation (issue 16).

tests/fake_ais_bench.py says which real source each generation follows.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runner.backends import BackendError, BackendOptions
from runner.backends.acl import AclBackend
from tests.fake_acl import FakeAcl, FakeOm, expected, images, om_files
from tests.fake_ais_bench import GENERATIONS, NEW, OLD, fake_ais_bench

OPTS = BackendOptions()
BS1, BS16 = FakeOm(batch=1), FakeOm(batch=16)


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def install(env, registry, generation=NEW, **acl_kwargs):
    """ais_bench of ``generation`` over a fake pyACL of the same process."""
    acl = FakeAcl(registry, **acl_kwargs)
    env.setitem(sys.modules, "acl", acl)
    module = fake_ais_bench(registry, generation, acl)
    env.setitem(sys.modules, "ais_bench.infer.interface", module)
    env.delitem(sys.modules, "ais_bench", raising=False)
    return module.process, acl


def on_another_thread(fn, *args):
    with ThreadPoolExecutor(1, "ray-actor-pool") as pool:
        return pool.submit(fn, *args).result()


@pytest.mark.parametrize("generation", GENERATIONS, ids=lambda g: g.name)
def test_opened_on_one_thread_run_and_closed_on_another(env, tmp_path, generation):
    """Issue 16 "done when": padded partial batches from another thread, right logits, a
    positive compute time, and a clean close (items 1, 2, 3 and 9)."""
    env.setenv("ASCEND_RT_VISIBLE_DEVICES", "1")
    registry = om_files(tmp_path, m_bs1=BS1, m_bs16=BS16)
    process, acl = install(env, registry, generation)
    backend = AclBackend(dict(zip((1, 16), registry, strict=True)), 1, OPTS)
    assert backend.provider == "ais_bench" and backend.logical_id == 0
    assert [e[1:] for e in process.events if e[0] == "InferSession"] == [(0, p) for p in registry]

    logits, seconds = on_another_thread(backend.run, images(5, BS16))  # padded to 16
    np.testing.assert_array_equal(logits, expected(5, BS16.classes))
    assert seconds == pytest.approx(2.5 * 16 / 1000)  # the fake's execute time, in ms
    logits, seconds = on_another_thread(backend.run, images(20, BS16))  # 16, then 4 padded
    np.testing.assert_array_equal(logits, expected(20, BS16.classes))
    assert seconds == pytest.approx(2 * 2.5 * 16 / 1000)
    fed = [e[1] for e in process.events if e[0] == "infer"]
    assert [len(batch) for batch in fed] == [16, 16, 16] and not fed[0][5:].any()

    on_another_thread(backend.close)
    tail = process.events[-3:]
    if generation.free_resource:
        assert tail == [("free_resource", 16), ("free_resource", 1), ("finalize", 0)]
    else:  # every other session destroyed before the one finalize, through the last
        assert tail[1:] == [("del", 1), ("finalize", 0)]
    assert process.names().count("finalize") == 1 and process.live == set()
    assert not acl.initialised
    assert acl.names() == ["acl.rt.get_device_count"]  # ACL is ais_bench's


def test_exec_time_pairs_are_end_minus_start(env, tmp_path):
    """Item 1: since ait 8c67f6f51 an entry is (start_ms, end_ms) from the session's start."""
    registry = om_files(tmp_path, m_bs16=BS16)
    install(env, registry, NEW)
    backend = AclBackend(next(iter(registry)), 0, OPTS)
    seconds = [backend.run(images(16, BS16))[1] for _ in range(3)]
    assert seconds == pytest.approx([0.04, 0.04, 0.04])
    backend.close()


def test_runtime_that_ignores_visible_devices_reopens_on_the_physical_chip(env, tmp_path):
    """Item 4 on the ais_bench path: the count comes from pyACL once ais_bench has
    initialised ACL; sessions opened on chip 0 by mistake are freed and opened on chip 3."""
    env.setenv("ASCEND_RT_VISIBLE_DEVICES", "3")
    registry = om_files(tmp_path, m_bs16=BS16)
    process, _ = install(env, registry, NEW, reads_visible=False)
    backend = AclBackend(next(iter(registry)), 3, OPTS)
    assert backend.logical_id == 3 and "ignores" in backend.placement.note
    opened = [e[1] for e in process.events if e[0] == "InferSession"]
    assert opened == [0, 3] and ("free_resource", 16) in process.events
    np.testing.assert_array_equal(backend.run(images(2, BS16))[0], expected(2, BS16.classes))
    backend.close()


def test_a_second_backend_shares_ais_bench_and_the_last_close_finalizes(env, tmp_path):
    """Items 2 and 9: finalize ends ACL for the whole process, so only the last close calls
    it, and nothing can open ais_bench in this process afterwards."""
    registry = om_files(tmp_path, m_bs16=BS16)
    process, _ = install(env, registry, OLD)
    first = AclBackend(next(iter(registry)), 0, OPTS)
    second = AclBackend(next(iter(registry)), 1, OPTS)
    first.close()
    assert "finalize" not in process.names()
    np.testing.assert_array_equal(second.run(images(3, BS16))[0], expected(3, BS16.classes))
    second.close()
    assert process.events[-1] == ("finalize", 0)
    with pytest.raises(BackendError, match="cannot initialise again in the same process"):
        AclBackend(next(iter(registry)), 0, OPTS)


def test_int32_output_is_refused(env, tmp_path):
    """Item 7 on the ais_bench path: its tensor descriptions carry the datatype."""
    registry = om_files(tmp_path, m_bs16=FakeOm(16, out_dtype="int32"))
    process, _ = install(env, registry, OLD)
    with pytest.raises(BackendError, match="^m_bs16.om: output 0 is int32; expected float32"):
        AclBackend(next(iter(registry)), 0, OPTS)
    assert process.events[-1] == ("finalize", 0) and process.live == set()


def test_ais_bench_failure_is_one_line(env, tmp_path):
    registry = om_files(tmp_path, m_bs16=BS16)
    env.setitem(sys.modules, "ais_bench.infer.interface", fake_ais_bench({}, NEW))
    env.delitem(sys.modules, "ais_bench", raising=False)
    env.setitem(sys.modules, "acl", None)
    with pytest.raises(BackendError) as err:
        AclBackend(next(iter(registry)), 0, OPTS)
    assert str(err.value) == (
        f"ais_bench InferSession failed: load model failed: {next(iter(registry))} "
        "(device 0, model m_bs16.om)"
    )
