"""runner.score must give the guide's result.json for tool outputs, byte for byte."""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runner.metrics import Accuracy, LabelFile, hit_ranks, read_labels, topk_indices
from runner.score import ScoreError, score_outputs

REPO = Path(__file__).resolve().parents[1]
N = 30


def _stem(i: int) -> str:
    return f"ILSVRC2012_val_{i + 1:08d}"


def _logits(num_classes: int, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).standard_normal((N, num_classes)).astype(np.float32)
    if num_classes == 1001:
        logits[:, 0] = -100  # background never ranks, so every label below is >= 0
    return logits


def _write_labels(path: Path, logits: np.ndarray) -> np.ndarray:
    """Image i's label sits at rank i % 6 of its logits (5: outside the top 5)."""
    order = np.argsort(-logits, axis=1)
    offset = 1 if logits.shape[1] == 1001 else 0
    labels = np.array([order[i, i % 6 if i % 6 < 5 else 10] for i in range(N)]) - offset
    path.write_text("".join(f"{_stem(i)}.JPEG {c}\n" for i, c in enumerate(labels)))
    return labels


def _expected(logits: np.ndarray, labels: np.ndarray) -> str:
    c = logits.shape[1]
    acc = Accuracy.from_ranks(hit_ranks(topk_indices(logits), labels, c), c)
    assert acc.topk == pytest.approx([5 / N, 10 / N, 15 / N, 20 / N, 25 / N])
    return acc.to_guide_json()


def _benchmark_txt(folder: Path, i: int, row: np.ndarray) -> np.ndarray:
    # The benchmark tool: one line, space after every value.
    (folder / f"{_stem(i)}_1.txt").write_text("".join(f"{float(v)!r} " for v in row) + "\n")
    return row


def _benchmark_bin(folder: Path, i: int, row: np.ndarray) -> np.ndarray:
    row.tofile(folder / f"{_stem(i)}_1.bin")
    return row


def _ais_bin(folder: Path, i: int, row: np.ndarray) -> np.ndarray:
    row.tofile(folder / f"{_stem(i)}_0.bin")
    return row


def _ais_npy(folder: Path, i: int, row: np.ndarray) -> np.ndarray:
    np.save(folder / f"{_stem(i)}_0.npy", row[None])  # [1, C], as the model returns it
    return row


def _ais_txt(folder: Path, i: int, row: np.ndarray) -> np.ndarray:
    # ais_bench: np.savetxt with "%f" and newline=" ", so six decimals are all there is.
    text = "".join(f"{v:f} " for v in row)
    (folder / f"{_stem(i)}_0.txt").write_text(text + "\n")
    return np.array(text.split(), dtype=np.float32)


def _outputs(folder: Path, labels_path: Path, writer=_benchmark_txt, num_classes=1000):
    """Write N outputs with ``writer``; returns the result.json metrics gives for them."""
    folder.mkdir(parents=True, exist_ok=True)
    logits = _logits(num_classes)
    labels = _write_labels(labels_path, logits)
    seen = np.stack([writer(folder, i, row) for i, row in enumerate(logits)])
    return _expected(seen, labels)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner.score", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_reproduces_result_json_from_benchmark_text_outputs(tmp_path):
    out_dir = tmp_path / "result" / "dumpOutput_device0"
    expected = _outputs(out_dir, tmp_path / "val_label.txt")
    (out_dir / "sumary.json").write_text("{}")
    result = tmp_path / "result.json"
    proc = _cli(out_dir, tmp_path / "val_label.txt", result)
    assert proc.returncode == 0, proc.stderr
    assert result.read_text() == expected
    assert proc.stderr.splitlines() == [
        "skipped sumary.json: not a benchmark/ais_bench output name"
    ]
    assert f"scored {N} outputs (1000 classes), skipped 1" in proc.stdout
    assert "Top1   16.67%" in proc.stdout and "Top5   83.33%" in proc.stdout


@pytest.mark.parametrize("writer", [_benchmark_bin, _ais_bin, _ais_npy, _ais_txt])
def test_binary_and_ais_bench_outputs(tmp_path, writer):
    expected = _outputs(tmp_path / "out", tmp_path / "val_label.txt", writer)
    (tmp_path / "out" / "2024_01_01-10_00_00_summary.json").write_text("{}")
    acc, skipped = score_outputs(tmp_path / "out", tmp_path / "val_label.txt")
    assert acc.to_guide_json() == expected
    assert [name for name, _ in skipped] == ["2024_01_01-10_00_00_summary.json"]


@pytest.mark.parametrize("writer", [_benchmark_txt, _benchmark_bin])
def test_1001_class_outputs_shift_labels_past_background(tmp_path, writer):
    expected = _outputs(tmp_path / "out", tmp_path / "val_label.txt", writer, 1001)
    acc, skipped = score_outputs(tmp_path / "out", tmp_path / "val_label.txt")
    assert (acc.num_classes, skipped) == (1001, [])
    assert acc.to_guide_json() == expected
    assert json.loads(expected)["value"][1] == {"key": "Number of classes", "value": "1001"}


def test_parent_of_several_device_folders_counts_a_duplicate_once(tmp_path):
    labels = tmp_path / "val_label.txt"
    expected = _outputs(tmp_path / "all", labels)
    for i, f in enumerate(sorted((tmp_path / "all").iterdir())):
        device = tmp_path / "result" / f"dumpOutput_device{i % 2}"
        device.mkdir(parents=True, exist_ok=True)
        f.rename(device / f.name)
    first = tmp_path / "result" / "dumpOutput_device0" / f"{_stem(0)}_1.txt"
    (tmp_path / "result" / "dumpOutput_device1" / first.name).write_bytes(first.read_bytes())
    acc, skipped = score_outputs(tmp_path / "result", read_labels(labels))
    assert acc.to_guide_json() == expected
    assert skipped == [
        (
            f"dumpOutput_device1/{_stem(0)}_1.txt",
            f"duplicate: {_stem(0)} already scored from dumpOutput_device0/{_stem(0)}_1.txt",
        )
    ]


def test_stray_and_bad_files_are_listed_not_fatal(tmp_path):
    out = tmp_path / "out"
    labels = tmp_path / "val_label.txt"
    expected = _outputs(out, labels, _benchmark_bin)
    labels.write_text(labels.read_text() + f"{_stem(N)}.JPEG 3\n{_stem(N + 1)}.JPEG 4\n")
    (out / "README").write_text("outputs\n")
    (out / "ILSVRC2012_val_99999999_1.bin").write_bytes(bytes(4000))
    (out / f"{_stem(N)}_1.bin").write_bytes(bytes(4001))
    np.arange(10, dtype=np.float32).tofile(out / f"{_stem(N + 1)}_1.bin")
    (out / f"{_stem(N + 1)}_0.txt").write_text("1.0 2.0 nope \n")
    np.save(out / f"{_stem(N + 1)}_0.npy", np.zeros((2, 1000), np.float32))
    acc, skipped = score_outputs(out, labels)
    assert acc.to_guide_json() == expected
    assert dict(skipped) == {
        "ILSVRC2012_val_99999999_1.bin": "no label for ILSVRC2012_val_99999999",
        "README": "not a benchmark/ais_bench output name",
        f"{_stem(N)}_1.bin": "4001 bytes is not a float32 vector",
        f"{_stem(N + 1)}_1.bin": "10 classes, the other outputs have 1000",
        f"{_stem(N + 1)}_0.txt": "could not convert string to float: 'nope'",
        f"{_stem(N + 1)}_0.npy": "shape (2, 1000) is not one image's logits",
    }


def test_nothing_scorable_raises(tmp_path):
    (tmp_path / "README").write_text("x")
    with pytest.raises(ScoreError, match="no output file could be scored"):
        score_outputs(tmp_path, LabelFile(tmp_path / "val_label.txt", {"a": 1}, {"a": 1}))


def test_bom_crlf_labels_and_spaced_names_score_like_the_clean_file(tmp_path):
    """The labels file as a Windows spreadsheet export writes it, and an image whose name
    holds spaces (its output ``my image 3_1.txt``), read by the runner's one reader."""
    out, labels = tmp_path / "out", tmp_path / "val_label.txt"
    expected = _outputs(out, labels)
    spaced = "my image 3"
    (out / f"{_stem(2)}_1.txt").rename(out / f"{spaced}_1.txt")
    rows = labels.read_text().replace(f"{_stem(2)}.JPEG", f"{spaced}.JPEG")
    labels.write_bytes(codecs.BOM_UTF8 + rows.replace("\n", "\r\n").encode())
    acc, skipped = score_outputs(out, labels)
    assert (acc.to_guide_json(), skipped) == (expected, [])


@pytest.mark.parametrize("num_classes, line, message", [
    (1000, "1000", "class 1000 is outside 0..999, the valid classes for a 1000-class model"),
    (1001, "-1", "class -1 is outside 0..999, the valid classes for a 1001-class model "
                 "(index 0 is background)"),
])
def test_cli_refuses_a_label_outside_the_outputs_classes(tmp_path, num_classes, line, message):
    """The class count is the outputs' width; the bad row needs no output of its own (a 0
    row: the file is not 1-based, see tests/test_labels.py for that hint)."""
    out, labels = tmp_path / "out", tmp_path / "val_label.txt"
    _outputs(out, labels, _benchmark_bin, num_classes)
    labels.write_text(labels.read_text() + f"zero.JPEG 0\nunscored.JPEG {line}\n")
    proc = _cli(out, labels, tmp_path / "result.json")
    assert proc.returncode == 2
    assert proc.stderr == f"score: error: labels file {labels}:{N + 2}: {message}\n"
    assert not (tmp_path / "result.json").exists()


def test_cli_refuses_a_conflicting_duplicate_label(tmp_path):
    out, labels = tmp_path / "out", tmp_path / "val_label.txt"
    _outputs(out, labels)
    first = labels.read_text().splitlines()[0].split()
    other = (int(first[1]) + 1) % 1000
    labels.write_text(labels.read_text() + f"{first[0]} {other}\n")
    proc = _cli(out, labels, tmp_path / "result.json")
    assert proc.returncode == 2
    assert proc.stderr == (f"score: error: labels file {labels}:{N + 1}: {_stem(0)} is class "
                           f"{other} here but class {first[1]} on line 1\n")


@pytest.mark.parametrize("case", ["missing dir", "missing labels", "only strays"])
def test_cli_errors_exit_2_with_one_line(tmp_path, case):
    out_dir = tmp_path / "out"
    labels = tmp_path / "val_label.txt"
    _outputs(out_dir, labels)
    if case == "missing dir":
        out_dir = tmp_path / "nope"
    elif case == "missing labels":
        labels = tmp_path / "no_labels.txt"
    else:
        for f in out_dir.iterdir():
            f.rename(f.with_suffix(".log"))
    proc = _cli(out_dir, labels, tmp_path / "result.json")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("score: error: ")
    assert not (tmp_path / "result.json").exists()
