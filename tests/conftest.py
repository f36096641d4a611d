"""Shared fixtures: one embedded Ray for the whole session, tiny real ONNX models, images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
VAL_ORIG = SAMPLE / "val_orig"
VAL_227 = SAMPLE / "val_227"

needs_val_orig = pytest.mark.skipif(
    not VAL_ORIG.is_dir(), reason=f"real ImageNet sample not present at {VAL_ORIG}"
)
needs_val_227 = pytest.mark.skipif(
    not VAL_227.is_dir(), reason=f"real ImageNet sample not present at {VAL_227}"
)


@pytest.fixture(scope="session")
def ray_session():
    """Embedded Ray with 4 fake NPUs and 8 emulated chips, shared by all pipeline tests."""
    import ray

    from runner.devices import EMULATED_RESOURCE
    from runner.ray_start import start_ray

    start_ray(None, {"NPU": 4, EMULATED_RESOURCE: 8})
    yield ray
    ray.shutdown()


def tiny_classifier(path: Path, size: int = 300, classes: int = 1000, seed: int = 0,
                    uint8_nhwc: bool = False) -> Path:
    """A real ONNX classifier: global average pool -> fully connected, random weights.

    ``uint8_nhwc`` makes it take raw uint8 NHWC crops (cast and transposed in the graph),
    like a model exported with normalisation baked in.
    """
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((3, classes)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32) * 0.1, "b")
    nodes = [
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["class"]),
    ]
    if uint8_nhwc:
        nodes[:0] = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
                     helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2])]
        image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])
    else:
        nodes[:0] = [helper.make_node("Identity", ["image"], ["nchw"])]
        image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])
    graph = helper.make_graph(
        nodes, "tiny", [image],
        [helper.make_tensor_value_info("class", TensorProto.FLOAT, ["batch", classes])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_classifier(tmp_path_factory.mktemp("models") / "tiny.onnx")


def journal_indices(out: Path) -> list[int]:
    """Every image index a run folder's journal records, sorted (once each if exactly once)."""
    lines = (out / "journal.jsonl").read_text().splitlines()[1:]
    return sorted(i for line in lines for i in json.loads(line)["indices"])


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` small JPEGs of varied sizes (a few grayscale) and their val_label.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        w, h = int(rng.integers(200, 520)), int(rng.integers(200, 520))
        arr = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(arr).resize((w, h), Image.BILINEAR)
        if i % 9 == 4:
            im = im.convert("L")
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        im.save(folder / name, quality=85)
        lines.append(f"{name} {int(rng.integers(0, 1000))}\n")
    labels = folder / "val_label.txt"
    labels.write_text("".join(lines))
    return labels


@pytest.fixture(scope="session")
def images64(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images64")
    return folder, write_images(folder, 64)


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def small_shards(tmp_path):
    """Two indexed shards of 4 labelled synthetic images each, and the images."""
    images = tmp_path / "images"
    from runner.shard import main as shard_main

    write_images(images, 8)
    out = tmp_path / "shards"
    assert shard_main([str(images), str(out), "--labels", str(images / "val_label.txt"),
                       "--shard-size", "4"]) == 0
    return images, out
