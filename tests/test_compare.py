"""runner.compare on real runs: Lite0 fp32 and its INT8 model on real val_227 images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import VAL_227, needs_val_227, needs_val_orig, write_images
from test_quantize import lite0_models

from runner.classes import class_table
from runner.compare import main, mcnemar_exact_p
from runner.config import RunConfig
from runner.evaluate import main as evaluate
from runner.evaluation import run_evaluation
from runner.metrics import image_key, read_labels
from runner.report import write_outputs

#: The first 224 val_227 images: on this machine INT8 and fp32 disagree on 6 of them and 3
#: flip (1 lost, 2 gained), so every part of the comparison has something to show.
LIMIT = 224


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory) -> tuple[Path, Path]:
    """fp32 and INT8 runs of the same images, logits kept."""
    fp32, int8, _ = lite0_models(tmp_path_factory)
    root = tmp_path_factory.mktemp("compare")
    for model, name in ((fp32, "fp32"), (int8, "int8")):
        assert evaluate(["--model", str(model), "--images", str(VAL_227), "--labels",
                         str(VAL_227 / "val_label.txt"), "--devices", "0-1", "--limit",
                         str(LIMIT), "--save-logits", "--no-progress",
                         "--out", str(root / name)]) == 0
    return root / "fp32", root / "int8"


def _json(folder: Path) -> dict:
    return json.loads((folder / "compare.json").read_text())


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _top1(run: Path) -> float:
    values = json.loads((run / "result.json").read_text())["value"]
    return float(next(v["value"] for v in values if v["key"] == "Top1 accuracy").rstrip("%"))


@needs_val_227
@needs_val_orig
def test_a_run_compared_with_itself(runs, tmp_path, capsys):
    fp32, _ = runs
    out = tmp_path / "self"
    assert main([str(fp32), str(fp32), "--out", str(out), "--min-agreement", "1",
                 "--max-top1-drop", "0"]) == 0
    printed = capsys.readouterr().out
    assert "gates passed: top-1 agreement 1.0000 >= 1, top-1 drop 0.00 points <= 0" in printed
    c = _json(out)
    assert c["images"] == LIMIT and c["top1_agreement"] == 1.0 and c["top5_overlap"] == 1.0
    assert c["flips"] == {"right_in_a_only": 0, "right_in_b_only": 0, "mcnemar_exact_p": 1.0}
    assert c["top1_drop_points"] == 0 and c["run_a"]["top1"] == _top1(fp32)
    logits = c["logits"]
    assert logits["max_abs_max"] == 0 and logits["relative_max"] == 0 and logits["worst"] == []
    assert logits["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert _rows(out / "flips.csv") == []
    per_class = _rows(out / "per_class_compare.csv")
    assert sum(int(r["images"]) for r in per_class) == LIMIT
    assert {r["top1_delta_pts"] for r in per_class} == {"0.0"}
    if c["notes"] and "matplotlib" in c["notes"][-1]:
        pytest.skip("matplotlib missing: compare.png not drawn")
    assert (out / "compare.png").stat().st_size > 10_000


@needs_val_227
@needs_val_orig
def test_fp32_against_int8(runs, tmp_path, capsys):
    fp32, int8 = runs
    out = tmp_path / "int8"
    assert main([str(fp32), str(int8), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    c = _json(out)
    assert c["run_a"]["top1"] == _top1(fp32) and c["run_b"]["top1"] == _top1(int8)
    assert c["run_a"]["precision"] == "fp32 (ONNX)" and c["run_b"]["precision"] == "int8 (ONNX)"
    lost, gained = c["flips"]["right_in_a_only"], c["flips"]["right_in_b_only"]
    assert c["top1_drop_points"] == pytest.approx(100 * (lost - gained) / LIMIT)
    assert c["flips"]["mcnemar_exact_p"] == mcnemar_exact_p(lost, gained)
    assert f"flips: {lost} right in A only, {gained} right in B only; McNemar exact p" in printed

    flips = _rows(out / "flips.csv")
    assert len(flips) == lost + gained
    for row in flips:  # each flip is right in exactly one run
        assert (row["a_top1"] == row["label"]) != (row["b_top1"] == row["label"])
    a_pred = {r["image"]: r for r in _rows(fp32 / "predictions.csv")}
    b_pred = {r["image"]: r for r in _rows(int8 / "predictions.csv")}
    agree = sum(a_pred[n]["top1"] == b_pred[n]["top1"] for n in a_pred)
    assert c["top1_agreement"] == agree / LIMIT
    assert 0.9 <= c["top1_agreement"] <= 1.0

    # INT8 logits differ from fp32's everywhere, but not by much.
    logits = c["logits"]
    assert 0 < logits["relative_mean"] < 0.5 and 0.9 < logits["cosine_mean"] < 1.0
    a = np.load(fp32 / "logits.npy").astype(np.float64)
    b = np.load(int8 / "logits.npy").astype(np.float64)
    worst = logits["worst"][0]
    i = sorted(a_pred).index(worst["image"])
    want = np.linalg.norm(b[i] - a[i]) / np.linalg.norm(a[i])
    assert worst["relative"] == pytest.approx(want, rel=1e-9)
    assert logits["max_abs_max"] == pytest.approx(float(np.max(np.abs(b - a))), rel=1e-6)

    deltas = _rows(out / "per_class_compare.csv")
    assert sum(int(r["lost"]) for r in deltas) == lost
    assert sum(int(r["gained"]) for r in deltas) == gained
    assert all(r["name"] for r in deltas)


@needs_val_227
@needs_val_orig
def test_gates_exit_3_naming_the_gate(runs, tmp_path, capsys):
    fp32, int8 = runs
    c_out = tmp_path / "c"
    assert main([str(fp32), str(int8), "--out", str(c_out)]) == 0
    measured = _json(c_out)
    drop, agreement = measured["top1_drop_points"], measured["top1_agreement"]
    capsys.readouterr()

    assert main([str(fp32), str(int8), "--out", str(c_out), "--max-top1-drop",
                 f"{drop - 0.1}"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"compare: --max-top1-drop failed: top-1 drop {drop:.2f} points > "
                   f"{drop - 0.1:g}"]
    assert _json(c_out)["gates_failed"] == [err[0].removeprefix("compare: ")]
    assert main([str(fp32), str(int8), "--out", str(c_out), "--max-top1-drop", f"{drop}",
                 "--min-agreement", f"{agreement}"]) == 0
    if agreement < 1:
        assert main([str(fp32), str(int8), "--out", str(c_out), "--min-agreement", "1"]) == 3
        assert "compare: --min-agreement failed" in capsys.readouterr().err


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(run, dest)
    return dest


def _rewrite_predictions(run: Path, change) -> None:
    path = run / "predictions.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = [rows[0], *change(rows[1:])]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@needs_val_227
@needs_val_orig
def test_runs_that_cannot_be_compared_exit_2_saying_what_differs(runs, tmp_path, capsys):
    fp32, int8 = runs
    fewer = _copy(int8, tmp_path, "fewer")
    _rewrite_predictions(fewer, lambda rows: rows[:-1])
    relabelled = _copy(int8, tmp_path, "relabelled")
    _rewrite_predictions(relabelled, lambda rows: [[rows[0][0], "7", *rows[0][2:]], *rows[1:]])
    other_recipe = _copy(int8, tmp_path, "recipe")
    journal = (other_recipe / "journal.jsonl").read_text().splitlines()
    header = json.loads(journal[0])
    header["run"]["recipe"] = "tf-lite-240"
    (other_recipe / "journal.jsonl").write_text("\n".join([json.dumps(header), *journal[1:]]))
    last = _rows(fp32 / "predictions.csv")[-1]["image"]
    first = _rows(fp32 / "predictions.csv")[0]
    cases = [
        (fewer, f"different image lists: 1 images only in A, 0 only in B (e.g. {last})"),
        (relabelled, f"different labels for 1 images (e.g. {first['image']}: "
                     f"{first['label']} in A, 7 in B)"),
        (other_recipe, "different recipes: tf-lite (A) vs tf-lite-240 (B)"),
        (tmp_path / "missing", f"{tmp_path / 'missing'} is not a directory"),
        (VAL_227, f"{VAL_227}: no journal.jsonl (not a cardrunner run folder)"),
    ]
    for run_b, message in cases:
        assert main([str(fp32), str(run_b), "--out", str(tmp_path / "out")]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"compare: error: {message}"]
    assert main([str(fp32), str(int8), "--min-agreement", "95"]) == 2
    assert capsys.readouterr().err.strip() == (
        "compare: error: --min-agreement is a share from 0 to 1, got 95")


@needs_val_227
@needs_val_orig
def test_row_order_and_missing_logits(runs, tmp_path):
    fp32, int8 = runs
    assert main([str(fp32), str(int8), "--out", str(tmp_path / "plain")]) == 0
    plain = _json(tmp_path / "plain")
    shuffled = _copy(int8, tmp_path, "shuffled")
    _rewrite_predictions(shuffled, lambda rows: rows[::-1])
    assert main([str(fp32), str(shuffled), "--out", str(tmp_path / "shuffled_out")]) == 0
    again = _json(tmp_path / "shuffled_out")
    for key in ("top1_agreement", "top5_overlap", "flips", "logits", "top1_drop_points"):
        assert again[key] == plain[key], key

    no_logits = _copy(int8, tmp_path, "no_logits")
    (no_logits / "logits.npy").unlink()
    assert main([str(fp32), str(no_logits), "--out", str(tmp_path / "nl")]) == 0
    assert _json(tmp_path / "nl")["logits"] is None
    assert _json(tmp_path / "nl")["flips"] == plain["flips"]


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 1), (1, 2), (24, 15), (0, 7), (100, 130),
                                      (1500, 1600), (50, 50)])
def test_mcnemar_exact_p_matches_scipy(b, c):
    stats = pytest.importorskip("scipy.stats", reason="scipy is the independent oracle")
    want = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact_p(b, c) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_logits_are_matched_by_index_whatever_order_the_source_lists(ray_session, tmp_path):
    # An ImageFolder tree indexes its images class folder by class folder, not in sorted
    # name order: the flat folder's and the tree's logits.npy hold the same images in
    # different rows, and compare must still pair each image with its own logits.
    flat = tmp_path / "flat"
    truth = read_labels(write_images(flat, 12)).classes
    wnids = [w for w, _ in class_table()]
    tree = tmp_path / "tree"
    for image in sorted(flat.glob("*.JPEG")):
        folder = tree / wnids[truth[image_key(image.name)]]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / image.name)
    for images, labels, out in ((flat, flat / "val_label.txt", "a"), (tree, None, "b")):
        cfg = RunConfig(backend="emulated", images=str(images),
                        labels=str(labels) if labels else None, devices="0-1", batch_size=2,
                        keep_logits=True, out=str(tmp_path / out), progress=False,
                        emulated_latency_ms=1.0)
        write_outputs(run_evaluation(cfg), tmp_path / out)
    rows = [json.loads(line)["indices"] for line in
            (tmp_path / "b" / "journal.jsonl").read_text().splitlines()[1:]]
    assert sorted(i for r in rows for i in r) == list(range(12))
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    c = _json(tmp_path / "c")
    assert c["top1_agreement"] == 1.0
    assert c["logits"]["max_abs_max"] == 0.0 and c["logits"]["cosine_mean"] == 1.0
