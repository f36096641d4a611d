"""``python -m runner.shard``: WebDataset shards from any source, with an index each."""

from __future__ import annotations

import subprocess
import sys
import tarfile

import pytest
from conftest import write_images

from runner.dataset import load_dataset
from runner.shard import main, sample_key, write_shards
from runner.source_tar import INDEX_SUFFIX, decode_index, scan_tar


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    return folder, write_images(folder, 7)


def test_shards_hold_the_bytes_labels_and_an_exact_index(images, tmp_path, capsys):
    folder, labels = images
    out = tmp_path / "out"
    assert main([str(folder), str(out), "--labels", str(labels), "--shard-size", "3",
                 "--prefix", "val"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"shard: 7 images (7 labelled, labels from val_label.txt) in 3 shards of up to 3 in {out}")
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    truth = dict(line.split() for line in labels.read_text().splitlines())
    seen = []
    for tar in tars:
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".")
            image = f"{key}.JPEG"
            if ext == "cls":
                assert data.decode() == truth[image]
            else:
                assert data == (folder / image).read_bytes() and ext == "JPEG"
                seen.append(image)
        size, listing = decode_index((out / (tar.name + INDEX_SUFFIX)).read_bytes(), "index")
        scanned = scan_tar(str(tar), tar.stat().st_size)
        assert size == tar.stat().st_size and scanned.problem is None
        assert listing.entries == scanned.entries and listing.cls == scanned.cls
    assert seen == sorted(truth)


def test_shards_are_reproducible_and_never_overwritten(images, tmp_path, capsys):
    folder, labels = images
    for out in ("a", "b"):
        assert main([str(folder), str(tmp_path / out), "--labels", str(labels)]) == 0
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == \
        (tmp_path / "b/shard-000000.tar").read_bytes()
    capsys.readouterr()
    assert main([str(folder), str(tmp_path / "a"), "--labels", str(labels)]) == 2
    assert capsys.readouterr().err == (f"shard: error: {tmp_path / 'a'} already holds "
                                       "shard-000000.tar: remove the old shards or write to "
                                       "another folder\n")


def test_reshard_shards_and_unlabelled_sources(images, tmp_path, capsys):
    folder, labels = images
    assert main([str(folder), str(tmp_path / "first"), "--labels", str(labels),
                 "--shard-size", "2"]) == 0
    assert main([str(tmp_path / "first"), str(tmp_path / "second"), "--limit", "5"]) == 0
    again = load_dataset(tmp_path / "second", None)
    first = load_dataset(tmp_path / "first", None, limit=5)
    assert (again.names, again.labels) == (first.names, first.labels)
    assert main([str(folder), str(tmp_path / "bare")]) == 0  # no labels: no .cls members
    with tarfile.open(tmp_path / "bare/shard-000000.tar") as t:
        assert not [n for n in t.getnames() if n.endswith(".cls")]
    assert load_dataset(tmp_path / "bare", None).labels is None


def test_unreadable_and_unlabelled_images_are_named(images, tmp_path, capsys):
    folder, labels = images
    (folder / "extra.JPEG").write_bytes((folder / "ILSVRC2012_val_00000001.JPEG").read_bytes())
    dataset = load_dataset(folder, labels)
    (folder / "ILSVRC2012_val_00000002.JPEG").unlink()  # gone between listing and reading
    (tmp_path / "out").mkdir()
    stats = write_shards(dataset, str(tmp_path / "out"), 10, "shard")
    assert stats.images == 6
    assert stats.failed == [("ILSVRC2012_val_00000002.JPEG",
                             f"file not found: {folder / 'ILSVRC2012_val_00000002.JPEG'}")]
    capsys.readouterr()
    assert main([str(folder), str(tmp_path / "cli"), "--labels", str(labels)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "  not written: extra.JPEG: no label in val_label.txt"
    assert "labelled in val_label.txt but no file" in out[1] and out[-1].endswith("2 not written")


def test_bad_arguments_exit_2_in_one_line(images, tmp_path):
    folder, _ = images
    for args, message in [
        (["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
        (["--labels", str(tmp_path / "none.txt")], f"labels file {tmp_path / 'none.txt'} does "
                                                   "not exist"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "runner.shard", str(folder),
                               str(tmp_path / "out"), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr
        assert proc.stderr.strip().count("\n") <= 1 and "Traceback" not in proc.stderr


def test_sample_keys_keep_imagenet_names():
    assert sample_key("ILSVRC2012_val_00000293.JPEG") == "ILSVRC2012_val_00000293"
    assert sample_key("cats/a.b.jpg") == "cats/a_b"  # WebDataset keys end at the first dot
