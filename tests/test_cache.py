"""CropCache: round trip, concurrent writers, partial and stale caches, preserved errors."""

import json
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.cache import CacheBusyError, CropCache, cache_key
from runner.dataset import load_dataset
from runner.preprocess import get_recipe

HUAWEI = get_recipe("huawei")
PYCLS = get_recipe("pycls")
N = 6
FP = "0123456789abcdef"


def crops(recipe, n=N, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, recipe.crop, recipe.crop, 3)
    if recipe.wire_dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def build(root, recipe, data, errors=(), finalize=True):
    cache = CropCache.open(root, recipe, len(data), FP)
    assert not cache.complete
    w = cache.writer()
    for i, crop in enumerate(data):
        if i in errors:
            w.put_error(i, f"cannot decode: broken {i}")
        else:
            w.put(i, crop)
    w.close()
    if finalize:
        assert cache.finalize()
    return cache


@pytest.mark.parametrize("recipe", [HUAWEI, PYCLS], ids=lambda r: r.name)
def test_round_trip_with_errors(tmp_path, recipe):
    data = crops(recipe)
    build(tmp_path, recipe, data, errors={2})
    cache = CropCache.open(tmp_path, recipe, N, FP)
    assert cache.complete
    assert cache.errors == {2: "cannot decode: broken 2"}
    view = cache.read([3, 4, 5])
    assert view.dtype == recipe.wire_dtype and view.shape == (3, recipe.crop, recipe.crop, 3)
    np.testing.assert_array_equal(view, data[3:6])
    assert not view.flags.owndata and not view.flags.writeable  # zero-copy, read-only
    np.testing.assert_array_equal(cache.read([5, 0]), data[[5, 0]])
    pixels, kept, errors = cache.batch([1, 2, 3])
    np.testing.assert_array_equal(kept, [1, 3])
    np.testing.assert_array_equal(pixels, data[[1, 3]])
    assert errors == [(2, "cannot decode: broken 2")]
    pixels, kept, errors = cache.batch([2])
    assert pixels.shape == (0, recipe.crop, recipe.crop, 3) and errors and not len(kept)


def _write_half(cache, data, indices):
    w = cache.writer()
    for i in indices:
        w.put(i, data[i])
    w.close()


def test_two_processes_write_disjoint_shards(tmp_path):
    data = crops(HUAWEI)
    cache = CropCache.open(tmp_path, HUAWEI, N, FP)
    shipped = pickle.loads(pickle.dumps(cache))  # what a Ray actor receives
    child = multiprocessing.get_context("fork").Process(
        target=_write_half, args=(shipped, data, range(0, N, 2))
    )
    child.start()
    _write_half(cache, data, range(1, N, 2))
    child.join(10)
    assert child.exitcode == 0
    assert cache.finalize() and cache.complete
    reopened = CropCache.open(tmp_path, HUAWEI, N, FP)
    assert reopened.complete and reopened.errors == {}
    np.testing.assert_array_equal(reopened.read(range(N)), data)


def test_partial_cache_is_never_read_and_is_rebuilt(tmp_path):
    data = crops(HUAWEI)
    first = build(tmp_path, HUAWEI, data[:N], finalize=False)
    with pytest.raises(CacheBusyError):  # the crashed-run stand-in still holds the lock
        CropCache.open(tmp_path, HUAWEI, N, FP)
    first.close()  # what the driver's exit does

    cache = CropCache.open(tmp_path, HUAWEI, N, FP)
    assert not cache.complete
    assert not list((cache.directory / "records").iterdir())  # rebuilt from scratch
    w = cache.writer()
    w.put(0, data[0])
    w.close()
    assert not cache.finalize()  # indices 1.. neither stored nor failed
    assert not cache.complete and not (cache.directory / "manifest.json").exists()


def test_torn_record_line_is_ignored(tmp_path):
    data = crops(HUAWEI)
    cache = build(tmp_path, HUAWEI, data, finalize=False)
    record = next((cache.directory / "records").iterdir())
    with open(record, "a") as f:
        f.write('[3, "half a rec')
    assert cache.finalize()


def test_manifest_that_disagrees_is_not_trusted(tmp_path):
    build(tmp_path, HUAWEI, crops(HUAWEI))
    cache = CropCache.open(tmp_path, HUAWEI, N, FP)
    manifest = cache.directory / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "count": N + 1}))
    stale = CropCache.open(tmp_path, HUAWEI, N, FP)
    assert not stale.complete and not manifest.exists()  # reopening started a rebuild
    stale.close()

    build(tmp_path, HUAWEI, crops(HUAWEI), finalize=True)
    with open(cache.directory / "crops.raw", "r+b") as f:
        f.truncate(100)
    stale = CropCache.open(tmp_path, HUAWEI, N, FP)
    assert not stale.complete
    stale.close()


def test_recipe_and_file_list_change_the_key(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.JPEG", "b.JPEG"):
        Image.new("RGB", (8, 8)).save(folder / name)
    fp = load_dataset(folder, None).fingerprint()
    key = cache_key(HUAWEI, 2, fp)
    assert cache_key(PYCLS, 2, fp) != key
    assert cache_key(get_recipe("tf-lite"), 2, fp) != key
    assert cache_key(HUAWEI, 1, load_dataset(folder, None, limit=1).fingerprint()) != key
    Image.new("RGB", (8, 8)).save(folder / "c.JPEG")
    assert cache_key(HUAWEI, 2, load_dataset(folder, None, limit=2).fingerprint()) == key
    assert cache_key(HUAWEI, 3, load_dataset(folder, None).fingerprint()) != key
    a = folder / "a.JPEG"
    a.write_bytes(a.read_bytes()[::-1])  # rewritten in place at the same size
    os.utime(a, ns=(10**9, 10**9))  # with a modification time surely its own
    rewritten = cache_key(HUAWEI, 2, load_dataset(folder, None, limit=2).fingerprint())
    assert rewritten != key
    (folder / "b.JPEG").write_bytes((folder / "b.JPEG").read_bytes() + b"\0")  # new size
    os.utime(folder / "b.JPEG", ns=(0, 0))
    assert cache_key(HUAWEI, 2, load_dataset(folder, None, limit=2).fingerprint()) != rewritten


def test_writer_rejects_what_does_not_fit(tmp_path):
    cache = CropCache.open(tmp_path, HUAWEI, N, FP)
    w = cache.writer()
    with pytest.raises(ValueError):
        w.put(0, np.zeros((224, 224, 3), np.uint8))
    with pytest.raises(ValueError):
        w.put(0, np.zeros((300, 300, 3), np.float32))
    with pytest.raises(IndexError):
        w.put(N, np.zeros((300, 300, 3), np.uint8))
    with pytest.raises(IndexError):
        w.put_error(-1, "x")
    w.close()
    cache.close()


def test_new_file_is_sparse(tmp_path):
    cache = CropCache.open(tmp_path, PYCLS, 1000, FP)  # 1.08 GB of float32 crops
    crops_file = cache.directory / "crops.raw"
    assert crops_file.stat().st_size == cache.nbytes == 1000 * 300 * 300 * 3 * 4
    assert crops_file.stat().st_blocks * 512 < 1_000_000
    cache.close()


BUILDER = textwrap.dedent(f"""
    import sys, time
    from runner.cache import CropCache
    from runner.preprocess import get_recipe
    cache = CropCache.open(sys.argv[1], get_recipe("huawei"), {N}, "{FP}")
    assert not cache.complete
    print("building", flush=True)
    time.sleep(120)
""")


def test_a_cache_another_process_builds_is_not_read_until_that_process_ends(tmp_path):
    builder = subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path)],
                               cwd=Path(__file__).resolve().parents[1],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline() == "building\n"
        with pytest.raises(CacheBusyError) as busy:
            CropCache.open(tmp_path, HUAWEI, N, FP)
        key = cache_key(HUAWEI, N, FP)
        message = str(busy.value)
        assert "\n" not in message
        assert message.startswith(f"--cache: {tmp_path / key} is being built by another run "
                                  f"(pid {builder.pid} on {socket.gethostname()}, started ")
    finally:
        builder.send_signal(signal.SIGKILL)  # dies mid-build, without closing anything
        builder.wait()
        builder.stdout.close()
    cache = CropCache.open(tmp_path, HUAWEI, N, FP)  # the kernel dropped its lock
    assert not cache.complete  # its partial cache is rebuilt, never read
    build_rest = cache.writer()
    for i, crop in enumerate(crops(HUAWEI)):
        build_rest.put(i, crop)
    build_rest.close()
    assert cache.finalize()
