"""Recipes against hand-computed geometry and independent transcriptions of the references."""

import math
import struct
import zlib

import cv2
import numpy as np
import pytest
from conftest import VAL_ORIG, needs_val_orig
from PIL import Image

from runner.preprocess import (
    MAX_IMAGE_PIXELS,
    ImageError,
    crop_offsets,
    decode_crop,
    get_recipe,
    load_crop,
    reference_tensor,
    resized_size,
    tf_crop_box,
    to_tensor,
)

HUAWEI = get_recipe("huawei")
PYCLS = get_recipe("pycls")
TFLITE = get_recipe("tf-lite")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


@pytest.mark.parametrize(
    "size, expected",
    [
        ((500, 375), (456, 342)),  # landscape: long = int(342 * 500 / 375) = 456
        ((375, 500), (342, 456)),
        ((500, 333), (513, 342)),  # int(513.51...) truncates
        ((342, 500), (342, 500)),  # short side already 342: untouched
        ((600, 342), (600, 342)),
        ((138, 108), (437, 342)),  # 342 * 138 / 108 = 437.0 exactly
        ((300, 300), (342, 342)),
    ],
)
def test_huawei_resize_geometry(size, expected):
    assert resized_size(*size, HUAWEI) == expected


def test_pycls_resize_uses_its_own_float_order():
    # pycls computes int(138 / 108 * 342) = int(436.99999999999994) = 436, huawei 437.
    assert resized_size(138, 108, PYCLS) == (436, 342)
    assert resized_size(375, 500, PYCLS) == (342, 456)
    assert resized_size(342, 342, PYCLS) == (342, 342)


@pytest.mark.parametrize(
    "size, huawei, pycls",
    [
        ((456, 342), (78, 21), (78, 21)),
        ((301, 342), (0, 21), (1, 21)),  # round(0.5) = 0 (banker's), ceil(0.5) = 1
        ((303, 342), (2, 21), (2, 21)),  # round(1.5) = 2
        ((305, 342), (2, 21), (3, 21)),  # round(2.5) = 2, ceil(2.5) = 3
        ((342, 500), (21, 100), (21, 100)),
    ],
)
def test_crop_offsets_round_vs_ceil(size, huawei, pycls):
    assert crop_offsets(*size, HUAWEI) == huawei
    assert crop_offsets(*size, PYCLS) == pycls


def test_tf_lite_crop_box():
    # side = int(224 / 256 * 375) = 328; offsets (dim - side + 1) // 2
    assert tf_crop_box(500, 375, TFLITE) == (86, 24, 328)
    assert tf_crop_box(227, 227, TFLITE) == (15, 15, 198)
    # Lite1 at 240: int(240 / 272 * 375) = 330; Lite2 at 260: int(260 / 292 * 227) = 202.
    assert tf_crop_box(500, 375, get_recipe("tf-lite-240")) == (85, 23, 330)
    assert tf_crop_box(227, 227, get_recipe("tf-lite-260")) == (13, 13, 202)


def guide_transcription(path):
    """The guide's huawei steps written out plainly with PIL + numpy."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if not ((w <= h and w == 342) or (h <= w and h == 342)):
        new = (342, int(342 * h / w)) if w < h else (int(342 * w / h), 342)
        img = img.resize(new, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - 300) / 2.0)), int(round((w - 300) / 2.0))
    img = img.crop((left, top, left + 300, top + 300))
    arr = np.array(img, dtype=np.float32) / 255.0
    arr = arr.transpose(2, 0, 1).copy()
    for channel, m, s in zip(arr, MEAN, STD, strict=True):
        channel -= m
        channel /= s
    return np.ascontiguousarray(arr[::-1])  # RGB -> BGR


def pycls_transcription(path):
    """pycls's test-time _prepare_im written out plainly with cv2."""
    im = cv2.imread(str(path))
    im = im[:, :, ::-1].astype(np.float32) / 255
    h, w = im.shape[:2]
    if w < h and w != 342:
        w, h = 342, int(h / w * 342)
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    elif h <= w and h != 342:
        w, h = int(w / h * 342), 342
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    x, y = int(math.ceil((w - 300) / 2)), int(math.ceil((h - 300) / 2))
    im = im[y : y + 300, x : x + 300].copy()
    for i in range(3):
        im[:, :, i] = im[:, :, i] - MEAN[i]
        im[:, :, i] = im[:, :, i] / STD[i]
    return np.ascontiguousarray(im[:, :, ::-1].transpose([2, 0, 1]))


@needs_val_orig
@pytest.mark.parametrize("recipe, transcription", [(HUAWEI, guide_transcription),
                                                   (PYCLS, pycls_transcription)])
def test_bit_exact_on_real_val_images(recipe, transcription):
    paths = sorted(VAL_ORIG.glob("*.JPEG"))
    assert len(paths) == 20
    modes = set()
    for p in paths:
        modes.add(Image.open(p).mode)
        ours = reference_tensor(p, recipe)
        ref = transcription(p)
        assert ours.dtype == np.float32 and ours.shape == (3, 300, 300)
        assert np.array_equal(ours, ref), f"{p.name}: max diff {np.abs(ours - ref).max()}"
    assert "L" in modes  # the grayscale image is among them


def test_uint8_lookup_equals_direct_float_math():
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, size=(3, 300, 300, 3), dtype=np.uint8)
    out = to_tensor(crops, HUAWEI)
    x = crops.astype(np.float32) / np.float32(255)
    direct = (x - np.float32(MEAN)) / np.float32(STD)
    assert np.array_equal(out, direct[..., ::-1].transpose(0, 3, 1, 2))
    lite = to_tensor(crops[:, :224, :224], TFLITE)
    expect = ((crops[:, :224, :224].astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2)
    assert np.array_equal(lite, expect)


def tflite_transcription(path):
    """TF EfficientNet-Lite eval written out plainly with PIL + numpy."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    side = int(224 / 256 * min(w, h))
    left, top = (w - side + 1) // 2, (h - side + 1) // 2
    img = img.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
    return ((np.asarray(img, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


def test_tf_lite_transcription(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "x.JPEG"
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path)
    assert tf_crop_box(500, 375, TFLITE) == (86, 24, 328)
    assert np.array_equal(reference_tensor(path, TFLITE), tflite_transcription(path))


@needs_val_orig
def test_decode_crop_of_bytes_is_the_tf_lite_reference_on_real_images():
    for p in sorted(VAL_ORIG.glob("*.JPEG")):
        crop = decode_crop(p.read_bytes(), TFLITE, p.name)
        ours = to_tensor(crop[None], TFLITE)[0]
        ref = tflite_transcription(p)
        assert np.array_equal(ours, ref), f"{p.name}: max diff {np.abs(ours - ref).max()}"


def png_claiming(width, height):
    """A small PNG whose header claims ``width`` x ``height`` (valid CRCs), pixels absent."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def test_decode_crop_errors_are_load_crops(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (400, 400), (10, 20, 30)).save(good)
    cases = {"empty.JPEG": b"", "text.JPEG": b"this is not a jpeg\n",
             "truncated.JPEG": good.read_bytes()[:300], "bomb.png": png_claiming(9000, 9000)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for recipe in (HUAWEI, PYCLS, TFLITE):
            with pytest.raises(ImageError) as from_bytes:
                decode_crop(data, recipe, name)
            with pytest.raises(ImageError) as from_file:
                load_crop(tmp_path / name, recipe)
            assert str(from_bytes.value) == str(from_file.value)
            assert name not in str(from_bytes.value) and "\n" not in str(from_bytes.value)
    with pytest.raises(ImageError, match="^empty file \\(0 bytes\\)$"):
        decode_crop(b"", HUAWEI, "x.JPEG")
    with pytest.raises(ImageError, match=f"^9000x9000 exceeds the decompression-bomb limit of "
                                         f"{MAX_IMAGE_PIXELS} pixels$"):
        decode_crop(cases["bomb.png"], PYCLS, "bomb.png")


def test_bad_files_raise_one_line_image_errors(tmp_path):
    cases = {"empty.JPEG": b"", "text.JPEG": b"this is not a jpeg\n"}
    good = tmp_path / "good.jpg"
    Image.new("RGB", (400, 400), (10, 20, 30)).save(good)
    cases["truncated.JPEG"] = good.read_bytes()[:300]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for recipe in (HUAWEI, PYCLS):
            with pytest.raises(ImageError) as err:
                load_crop(tmp_path / name, recipe)
            assert "\n" not in str(err.value)
    with pytest.raises(ImageError, match=f"^file not found: {tmp_path / 'missing.JPEG'}$"):
        load_crop(tmp_path / "missing.JPEG", HUAWEI)


def test_png_named_jpeg_and_cmyk_decode_by_content(tmp_path):
    png = tmp_path / "png.JPEG"
    Image.new("RGB", (320, 400), (200, 100, 50)).save(png, format="PNG")
    cmyk = tmp_path / "cmyk.JPEG"
    Image.new("CMYK", (400, 320), (0, 128, 255, 0)).save(cmyk, format="JPEG")
    for p in (png, cmyk):
        assert load_crop(p, HUAWEI).shape == (300, 300, 3)
        assert load_crop(p, PYCLS).shape == (300, 300, 3)
