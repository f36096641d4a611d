"""``runner.prep`` against an independent transcription of the guide's preprocessing script."""

import csv
import glob
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import VAL_ORIG, needs_val_orig
from PIL import Image

from runner.prep import main
from runner.runlock import LOCK_NAME

# Real images that cover the geometry: int() truncation (500x333 -> 513), portrait upscale
# (251x333), grayscale, portrait downscale.
REAL = ["ILSVRC2012_val_00008570", "ILSVRC2012_val_00027834", "ILSVRC2012_val_00033079",
        "ILSVRC2012_val_00011297"]


def guide_bin(path: Path) -> bytes:
    """The guide's script as its README describes it, written out independently."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short, long_ = min(w, h), max(w, h)
    if short != 342:
        long_ = int(342 * long_ / short)
        im = im.resize((342, long_) if w < h else (long_, 342), Image.BILINEAR)
    w, h = im.size
    left, top = int(round((w - 300) / 2.0)), int(round((h - 300) / 2.0))
    im = im.crop((left, top, left + 300, top + 300))
    x = np.array(im, dtype=np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
        [0.229, 0.224, 0.225], np.float32
    )
    x = x[:, :, ::-1].transpose(2, 0, 1)  # BGR, CHW
    return np.ascontiguousarray(x).tobytes()


def check_info(info: Path, out: Path, expected: set[str]) -> None:
    lines = info.read_text().splitlines(keepends=True)
    order = glob.glob(os.path.join(out, "*.bin"))
    assert lines == [f"{i} {p} 300 300\n" for i, p in enumerate(order)]
    assert {Path(p).name for p in order} == expected


@needs_val_orig
def test_real_images_match_the_guide_byte_for_byte(ray_session, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for stem in REAL:
        shutil.copy(VAL_ORIG / f"{stem}.JPEG", images)
    out, info = tmp_path / "out", tmp_path / "val.info"
    assert main([str(images), str(out), "--info", str(info), "--workers", "2"]) == 0
    for stem in REAL:
        data = (out / f"{stem}.bin").read_bytes()
        assert len(data) == 1_080_000
        assert data == guide_bin(images / f"{stem}.JPEG"), stem
    check_info(info, out, {f"{s}.bin" for s in REAL})
    assert (out / "prep_errors.csv").read_text().splitlines() == ["image,reason"]


def test_broken_file_is_listed_and_the_others_written(ray_session, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    sizes = {"short342": (342, 501), "wide": (600, 342), "odd": (301, 457), "gray": (300, 200)}
    for stem, (w, h) in sizes.items():
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (im.convert("L") if stem == "gray" else im).save(images / f"{stem}.JPEG", quality=90)
    Image.new("RGBA", (400, 350), (10, 200, 30, 128)).save(images / "alpha.png")
    (images / "broken.JPEG").write_text("not an image\n")
    shutil.copy(images / "odd.JPEG", images / "odd.jpg")  # same stem: would overwrite odd.bin

    out, info = tmp_path / "out", tmp_path / "val.info"
    assert main([str(images), str(out), "--info", str(info)]) == 4

    good = ["short342", "wide", "odd", "gray", "alpha"]
    for stem in good:
        src = next(images.glob(f"{stem}.*"))
        assert (out / f"{stem}.bin").read_bytes() == guide_bin(src), stem
    assert not (out / "broken.bin").exists()
    with open(out / "prep_errors.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "reason"]
    failed = {Path(image).name: reason for image, reason in rows[1:]}
    assert set(failed) == {"broken.JPEG", "odd.jpg"}
    assert "cannot decode" in failed["broken.JPEG"]
    assert "odd.bin" in failed["odd.jpg"]
    err = capsys.readouterr().err
    assert "broken.JPEG" in err and "2 images failed" in err
    check_info(info, out, {f"{s}.bin" for s in good})


@pytest.mark.parametrize("problem", ["missing", "out-is-file", "workers", "empty"])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, problem):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.JPEG")
    argv = [str(images), str(out)]
    if problem == "missing":
        argv[0] = str(tmp_path / "nowhere")
    elif problem == "out-is-file":
        out.write_text("x")
    elif problem == "workers":
        argv += ["--workers", "0"]
    else:
        (images / "a.JPEG").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("prep: error:")
    assert "Traceback" not in err


HOLD_OUT = """
import sys, time
from runner.runlock import hold_run_folder
lock = hold_run_folder(sys.argv[1], "OUT")
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_prep_into_a_held_out_exits_2_naming_the_first(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    Image.new("RGB", (400, 350)).save(images / "a.JPEG")
    first = subprocess.Popen([sys.executable, "-c", HOLD_OUT, str(out)],
                             cwd=Path(__file__).resolve().parents[1],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "held\n"
        assert main([str(images), str(out)]) == 2
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"prep: error: OUT: {out} is in use by another run (pid {first.pid} "
                          f"on {socket.gethostname()}, started ")
    assert err.rstrip().endswith("wait for it to end or choose another OUT")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
