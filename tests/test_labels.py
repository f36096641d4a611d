"""The labels file is the truth every figure rests on: a row that cannot be trusted must stop
the run with one line naming it, never be scored (issue 18)."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import VAL_ORIG, needs_val_orig, write_images

from runner.backends.emulated import emulated_logits
from runner.config import RunConfig
from runner.dataset import load_dataset
from runner.evaluation import run_evaluation
from runner.metrics import Accuracy, LabelError, hit_ranks, image_key, read_labels
from runner.preprocess import get_recipe, load_crop
from runner.report import write_outputs

ONE_BASED = ("; every label lies in 1..1000 and none is 0: the file looks 1-based (the ILSVRC "
             "devkit's ground truth is, and its class order differs too)")


def labels_file(tmp_path: Path, text: str | bytes, name: str = "val_label.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# --------------------------------------------------------------------------- reading


def test_keys_by_name_before_first_dot_with_the_line_of_each_row(tmp_path):
    f = labels_file(tmp_path,
                    "ILSVRC2012_val_00000001.JPEG 65\n\nILSVRC2012_val_00000002.JPEG 970\n")
    table = read_labels(f)
    assert table.classes == {"ILSVRC2012_val_00000001": 65, "ILSVRC2012_val_00000002": 970}
    assert table.lines == {"ILSVRC2012_val_00000001": 1, "ILSVRC2012_val_00000002": 3}
    assert table.path == f
    assert image_key("dir/ILSVRC2012_val_00000001_1.txt") == "ILSVRC2012_val_00000001_1"


def test_bom_and_crlf_read_like_the_clean_file(tmp_path):
    clean = "ILSVRC2012_val_00000011.JPEG 109\nILSVRC2012_val_00004646.JPEG 920\n"
    bom = labels_file(tmp_path, codecs.BOM_UTF8 + clean.replace("\n", "\r\n").encode(), "b.txt")
    assert read_labels(bom).classes == read_labels(labels_file(tmp_path, clean)).classes
    assert "ILSVRC2012_val_00000011" in read_labels(bom).classes  # no "\ufeff" in the key
    old_mac = labels_file(tmp_path, clean.replace("\n", "\r"), "cr.txt")
    assert read_labels(old_mac).lines == {"ILSVRC2012_val_00000011": 1,
                                          "ILSVRC2012_val_00004646": 2}


def test_the_class_is_the_last_field_so_names_may_hold_spaces(tmp_path):
    f = labels_file(tmp_path, "my image 11.JPEG 109\n  photo\tof a cat.jpg\t  281  \n")
    assert read_labels(f).classes == {"my image 11": 109, "photo\tof a cat": 281}


def test_identical_duplicate_rows_are_one_label(tmp_path):
    f = labels_file(tmp_path, "a.JPEG 5\nb.JPEG 6\na.JPEG 5\n")
    table = read_labels(f)
    assert table.classes == {"a": 5, "b": 6}
    assert table.lines == {"a": 1, "b": 2}


def test_conflicting_duplicate_names_both_lines(tmp_path):
    f = labels_file(tmp_path, "a.JPEG 5\nb.JPEG 6\na.png 7\n")
    with pytest.raises(LabelError) as err:
        read_labels(f)
    assert str(err.value) == f"labels file {f}:3: a is class 7 here but class 5 on line 1"


@pytest.mark.parametrize("text, message", [
    ("a.JPEG 1\nb.JPEG\n", ":2: expected '<image> <class index>', got 'b.JPEG'"),
    ("a.JPEG 1\r\nb.JPEG x1\r\n", ":2: expected '<image> <class index>', got 'b.JPEG x1'"),
    ("a.JPEG 1.0\n", ":1: expected '<image> <class index>', got 'a.JPEG 1.0'"),
    # int() would read Arabic-Indic digits as 3; a labels file means ASCII digits.
    ("a.JPEG \u0663\n", ":1: expected '<image> <class index>', got 'a.JPEG \u0663'"),
    ("\n  \n", " holds no labels"),
])
def test_malformed_rows_name_the_line(tmp_path, text, message):
    f = labels_file(tmp_path, text)
    with pytest.raises(LabelError) as err:
        read_labels(f)
    assert str(err.value) == f"labels file {f}{message}"


def test_unreadable_encodings_and_missing_file(tmp_path):
    latin1 = labels_file(tmp_path, "a.JPEG 1\ncaf\xe9.JPEG 2\n".encode("latin-1"), "l.txt")
    with pytest.raises(LabelError) as err:
        read_labels(latin1)
    assert str(err.value) == (f"labels file {latin1}:2: not UTF-8 (byte 0xe9); "
                              "save the file as UTF-8")
    utf16 = labels_file(tmp_path, "a.JPEG 1\n".encode("utf-16"), "u.txt")  # Notepad "Unicode"
    with pytest.raises(LabelError) as err:
        read_labels(utf16)
    assert str(err.value) == f"labels file {utf16} is UTF-16; save it as UTF-8"
    with pytest.raises(LabelError) as err:
        read_labels(tmp_path / "nope.txt")
    assert str(err.value) == f"labels file {tmp_path / 'nope.txt'} does not exist"


# --------------------------------------------------------------------------- class range


def test_range_error_names_the_first_bad_line_and_the_valid_range(tmp_path):
    f = labels_file(tmp_path, "a.JPEG 0\nb.JPEG 999\nc.JPEG -1\nd.JPEG 1000\n")
    table = read_labels(f)
    with pytest.raises(LabelError) as err:
        table.check_range(1000)
    assert str(err.value) == (f"labels file {f}:3: class -1 is outside 0..999, the valid "
                              "classes for a 1000-class model")
    with pytest.raises(LabelError) as err:
        table.check_range(1001)  # background at 0 does not widen the labels' range
    assert str(err.value) == (f"labels file {f}:3: class -1 is outside 0..999, the valid "
                              "classes for a 1001-class model (index 0 is background)")
    read_labels(labels_file(tmp_path, "a.JPEG 0\nb.JPEG 999\n", "ok.txt")).check_range(1001)
    with pytest.raises(LabelError, match=r":2: class 10 is outside 0\.\.9, the valid classes "
                                         r"for a 10-class model$"):
        read_labels(labels_file(tmp_path, "a.JPEG 0\nb.JPEG 10\n", "ten.txt")).check_range(10)


def test_a_one_based_file_is_called_one_based(tmp_path):
    f = labels_file(tmp_path, "a.JPEG 1\nb.JPEG 1000\nc.JPEG 17\n")
    with pytest.raises(LabelError) as err:
        read_labels(f).check_range(1000)
    assert str(err.value) == (f"labels file {f}:2: class 1000 is outside 0..999, the valid "
                              f"classes for a 1000-class model{ONE_BASED}")
    with pytest.raises(LabelError) as err:
        read_labels(f).check_range(1001)  # a 1001-class model still takes labels 0..999
    assert str(err.value).endswith(f"1001-class model (index 0 is background){ONE_BASED}")


def test_the_dataset_checks_the_whole_labels_file(tmp_path):
    """Including rows of images outside this run (--limit, missing files): one such row means
    the file does not belong to the model."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.JPEG", "b b.JPEG", "c.JPEG"):
        (folder / name).write_bytes(b"listed, never decoded here")
    rows = b"a.JPEG 0\r\nb b.JPEG 4\r\nc.JPEG 5\r\n"
    f = labels_file(tmp_path, codecs.BOM_UTF8 + rows + b"gone.JPEG 1000\r\n")
    dataset = load_dataset(folder, f, limit=2)
    assert (dataset.names, dataset.labels, dataset.issues) == (["a.JPEG", "b b.JPEG"], [0, 4], [])
    load_dataset(folder, labels_file(tmp_path, rows, "good.txt"), limit=2).check_label_range(1000)
    with pytest.raises(LabelError) as err:
        dataset.check_label_range(1000)
    assert str(err.value) == (f"labels file {f}:4: class 1000 is outside 0..999, the valid "
                              "classes for a 1000-class model")
    assert load_dataset(folder, None).label_file is None
    load_dataset(folder, None).check_label_range(1000)  # nothing to check without labels


# --------------------------------------------------------------------------- end to end


def evaluate(folder: Path, labels: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runner.evaluate", "--backend", "emulated", "--devices", "0-1",
           "--images", str(folder), "--labels", str(labels), "--batch-size", "2",
           "--emulated-latency-ms", "5", "--out", str(out), "--no-progress"]
    return subprocess.run(cmd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's one error line (exit 2, nothing else of ours on stderr, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    ours = [line for line in lines if line.startswith("evaluate: ")]
    assert len(ours) == 1 and lines[-1] == ours[0], proc.stderr  # nothing of it on a next line
    return ours[0]


@needs_val_orig
def test_bom_crlf_file_and_a_spaced_name_score_like_the_clean_file(ray_session, tmp_path):
    """The emulated chip's logits are random, so the real classes would score 0 % in every
    case and hide a dropped or wrong row: each image gets the class its logits rank at
    i % 6 (5: outside the top 5), which makes every row count in result.json."""
    names = sorted(p.name for p in VAL_ORIG.glob("*.JPEG"))
    assert len(names) == 20
    recipe = get_recipe("huawei")
    top = np.argsort(-np.stack([emulated_logits(load_crop(VAL_ORIG / n, recipe))
                                for n in names]), axis=1)
    classes = [int(top[i, i % 6 if i % 6 < 5 else 10]) for i in range(len(names))]
    expected = Accuracy.from_ranks(hit_ranks(top[:, :5], np.array(classes), 1000), 1000)
    assert expected.topk == pytest.approx([0.2, 0.4, 0.55, 0.7, 0.85])
    clean = labels_file(tmp_path, "".join(f"{n} {c}\n" for n, c in zip(names, classes,
                                                                        strict=True)))
    result = run_evaluation(RunConfig(backend="emulated", images=str(VAL_ORIG),
                                      labels=str(clean), devices="0-1", batch_size=2,
                                      out=str(tmp_path / "clean"), progress=False,
                                      emulated_latency_ms=5.0))
    write_outputs(result, tmp_path / "clean")
    clean_json = (tmp_path / "clean" / "result.json").read_text()
    assert clean_json == expected.to_guide_json()

    # The same images, the second one renamed with spaces; the labels file as a Windows
    # spreadsheet export writes it: BOM, CRLF (the BOM lands on an ordinary first row).
    folder = tmp_path / "val_orig copy"
    shutil.copytree(VAL_ORIG, folder)
    spaced = f"my image {names[1]}"
    (folder / names[1]).rename(folder / spaced)
    rows = [f"{spaced if i == 1 else n} {c}\r\n" for i, (n, c) in
            enumerate(zip(names, classes, strict=True))]
    bom = labels_file(tmp_path, codecs.BOM_UTF8 + "".join(rows).encode(), "bom.txt")
    proc = evaluate(folder, bom, tmp_path / "bom")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "bom" / "result.json").read_text() == clean_json
    accuracy = json.loads((tmp_path / "bom" / "perf.json").read_text())["accuracy"]
    assert (accuracy["scored"], accuracy["not_scored"]) == (20, 0)
    assert (tmp_path / "bom" / "errors.csv").read_text().splitlines()[1:] == []
    # Row for row the clean run's predictions, the renamed image under its new name.
    bom_rows = (tmp_path / "bom" / "predictions.csv").read_text().splitlines()
    clean_rows = (tmp_path / "clean" / "predictions.csv").read_text().splitlines()
    assert sorted(bom_rows) == sorted(row.replace(names[1], spaced) for row in clean_rows)
    assert any(row.startswith(f"{spaced},{classes[1]},") for row in bom_rows)


def test_a_label_the_model_lacks_exits_2_naming_the_line(tmp_path):
    folder = tmp_path / "images"
    labels = write_images(folder, 3)
    names = [line.split()[0] for line in labels.read_text().splitlines()]
    labels.write_text(f"{names[0]} 1\n{names[1]} 1000\n{names[2]} 17\n")
    proc = evaluate(folder, labels, tmp_path / "run")
    assert error_line(proc) == (f"evaluate: error: labels file {labels}:2: class 1000 is "
                                f"outside 0..999, the valid classes for a 1000-class "
                                f"model{ONE_BASED}")
    assert not (tmp_path / "run").exists()


def test_a_negative_label_stops_the_run_before_anything_is_written(ray_session, tmp_path):
    folder = tmp_path / "images"
    labels = write_images(folder, 3)
    names = [line.split()[0] for line in labels.read_text().splitlines()]
    labels.write_text(f"{names[0]} 0\n\n{names[1]} -1\n{names[2]} 17\n")
    cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels), devices="0-1",
                    out=str(tmp_path / "run"), progress=False, emulated_latency_ms=5.0)
    with pytest.raises(LabelError) as err:
        run_evaluation(cfg)
    assert str(err.value) == (f"labels file {labels}:3: class -1 is outside 0..999, the valid "
                              "classes for a 1000-class model")
    assert not (tmp_path / "run").exists()


def test_a_conflicting_duplicate_exits_2_naming_both_lines(tmp_path):
    folder = tmp_path / "images"
    labels = write_images(folder, 2)
    first = labels.read_text().splitlines()[0].split()
    other = (int(first[1]) + 1) % 1000
    labels.write_text(labels.read_text() + f"{first[0]} {other}\n")
    proc = evaluate(folder, labels, tmp_path / "run")
    assert error_line(proc) == (f"evaluate: error: labels file {labels}:3: "
                                f"{image_key(first[0])} is class {other} here but class "
                                f"{first[1]} on line 1")
