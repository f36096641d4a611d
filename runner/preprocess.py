"""Named preprocessing recipes, each a bit-exact reimplementation of its reference.

A recipe is split in two stages so that only compact data crosses the object store:

* ``decode_crop`` (preprocessing actors, on bytes from ``runner.sources``; ``load_crop`` for
  a local file): decode, resize and crop.  It returns the crop as HWC uint8 RGB where the
  reference allows it (``huawei``, ``tf-lite``), or as HWC float32 where the reference
  resizes floats (``pycls``: /255 happens *before* the resize, so no
  uint8 intermediate can reproduce its tensors exactly).
* ``to_tensor`` (device actors): normalise, reorder channels and lay out as NCHW float32,
  with exactly the reference's float32 operations in the reference's order.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

#: Images with more pixels than this are refused as decompression bombs (PIL's own default
#: is 89.5 M; ImageNet's largest validation image has about 10 M).
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be decoded; the message says why in one line."""


@dataclass(frozen=True)
class Recipe:
    """A declarative preprocessing recipe.

    ``resize`` names the geometry rule (see ``resized_size``/``crop_offsets``).  Pixels are
    divided by ``scale`` first (when it is not 1), then ``(x - mean) / std`` per RGB channel,
    all in float32; ``channels`` is the channel order the model expects.
    """

    name: str
    decoder: str  # "pil" or "cv2"
    resize: str  # "short-side-int" | "short-side-pycls" | "crop-then-resize"
    resize_to: int  # short side after resize (huawei/pycls) or crop denominator (tf-lite)
    crop: int  # output height and width
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: str  # "BGR" or "RGB"
    scale: float  # divide pixel values by this before mean/std (1 = no division)
    wire_dtype: str  # dtype of the crop sent from preprocessing to the device actor
    reference: str


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="huawei",
            decoder="pil",
            resize="short-side-int",
            resize_to=342,
            crop=300,
            interpolation="bilinear",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            channels="BGR",
            scale=255.0,
            wire_dtype="uint8",
            reference="ModelZoo imagenet_torch_preprocess.py efficientnetB3 (REFERENCE.md 3)",
        ),
        Recipe(
            name="pycls",
            decoder="cv2",
            resize="short-side-pycls",
            resize_to=342,
            crop=300,
            interpolation="bilinear",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            channels="BGR",
            scale=1.0,  # the crop already holds x / 255 (pycls divides before resizing)
            wire_dtype="float32",
            reference="pycls datasets/imagenet.py _prepare_im, test split (REFERENCE.md 3)",
        ),
        *(
            # TF EfficientNet eval at each Lite variant's size: crop size / (size + 32) of the
            # short side, bicubic to size.  224 is Lite0's; Lite1 240, Lite2 260.
            Recipe(
                name="tf-lite" if size == 224 else f"tf-lite-{size}",
                decoder="pil",
                resize="crop-then-resize",
                resize_to=size + 32,
                crop=size,
                interpolation="bicubic",
                mean=(127.0, 127.0, 127.0),
                std=(128.0, 128.0, 128.0),
                channels="RGB",
                scale=1.0,
                wire_dtype="uint8",
                reference=f"EfficientNet-Lite eval: centre crop {size}/{size + 32}, bicubic "
                f"{size}, (x-127)/128",
            )
            for size in (224, 240, 260)
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(
            f"unknown preprocessing recipe {name!r}; choose one of {', '.join(RECIPES)}"
        ) from None


# --------------------------------------------------------------------------- geometry


def resized_size(width: int, height: int, recipe: Recipe) -> tuple[int, int]:
    """Size (w, h) after the recipe's short-side resize; unchanged when already there."""
    size = recipe.resize_to
    if recipe.resize == "short-side-int":
        # huawei: long side = int(size * long / short); short side already == size: no-op.
        if (width <= height and width == size) or (height <= width and height == size):
            return width, height
        if width < height:
            return size, int(size * height / width)
        return int(size * width / height), size
    if recipe.resize == "short-side-pycls":
        # pycls: int(long / short * size); note the different float evaluation order.
        if width < height and width != size:
            return size, int(height / width * size)
        if height <= width and height != size:
            return int(width / height * size), size
        return width, height
    raise ValueError(f"recipe {recipe.name} has no short-side resize")


def crop_offsets(width: int, height: int, recipe: Recipe) -> tuple[int, int]:
    """(left, top) of the centre crop on an image of the given (resized) size."""
    c = recipe.crop
    if recipe.resize == "short-side-int":
        return int(round((width - c) / 2.0)), int(round((height - c) / 2.0))
    if recipe.resize == "short-side-pycls":
        return int(math.ceil((width - c) / 2)), int(math.ceil((height - c) / 2))
    raise ValueError(f"recipe {recipe.name} has no post-resize crop")


def tf_crop_box(width: int, height: int, recipe: Recipe) -> tuple[int, int, int]:
    """tf-lite: (left, top, side) of the square centre crop taken before the resize."""
    side = int(recipe.crop / recipe.resize_to * min(width, height))
    return (width - side + 1) // 2, (height - side + 1) // 2, side


# --------------------------------------------------------------------------- decoding


def read_file(path: str | Path) -> bytes:
    """A local image file's bytes; ``ImageError`` naming the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"file not found: {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check_bomb(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{width}x{height} exceeds the decompression-bomb limit of {MAX_IMAGE_PIXELS} pixels"
        )


def _open_pil(data: bytes, name: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        _check_bomb(im.width, im.height)
        im.load()
        return im
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("cannot decode: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).replace(name, "<file>") if name else str(exc)
        raise ImageError(f"cannot decode: {text}") from None


def _decode_cv2(data: bytes) -> np.ndarray:
    # Check the pixel count from the header before cv2 allocates the full image.
    try:
        with Image.open(io.BytesIO(data)) as probe:
            _check_bomb(probe.width, probe.height)
    except ImageError:
        raise
    except Exception:  # noqa: BLE001 - cv2 may still decode what PIL cannot identify
        pass
    im = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if im is None:
        raise ImageError("cannot decode: OpenCV could not read the data")
    return im


def decode_crop(data: bytes, recipe: Recipe, name: str = "") -> np.ndarray:
    """Decode an image's bytes and return the recipe's crop as HWC (uint8 RGB or float32).

    The same bytes give the same crop wherever they were read from (a file, a tar member,
    an object store).  Raises ``ImageError`` with a one-line reason for anything that is not
    a usable image; ``name`` (the image's file or member name) is kept out of that reason,
    which reports print beside the name.
    """
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    if recipe.decoder == "cv2":
        bgr = _decode_cv2(data)
        im = bgr[:, :, ::-1].astype(np.float32) / 255  # pycls: HWC/BGR/int -> RGB/float
        h, w = im.shape[:2]
        nw, nh = resized_size(w, h, recipe)
        if (nw, nh) != (w, h):
            im = cv2.resize(im, (nw, nh), interpolation=cv2.INTER_LINEAR)
        left, top = crop_offsets(nw, nh, recipe)
        return np.ascontiguousarray(im[top : top + recipe.crop, left : left + recipe.crop])

    im = _open_pil(data, name)
    if im.mode != "RGB":
        im = im.convert("RGB")
    resample = Image.BICUBIC if recipe.interpolation == "bicubic" else Image.BILINEAR
    if recipe.resize == "crop-then-resize":
        left, top, side = tf_crop_box(im.width, im.height, recipe)
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((recipe.crop, recipe.crop), resample)
        return np.asarray(im)
    nw, nh = resized_size(im.width, im.height, recipe)
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), resample)
    left, top = crop_offsets(nw, nh, recipe)
    return np.asarray(im.crop((left, top, left + recipe.crop, top + recipe.crop)))


def load_crop(path: str | Path, recipe: Recipe) -> np.ndarray:
    """``decode_crop`` of a local file's bytes (``ImageError`` when it cannot be read)."""
    return decode_crop(read_file(path), recipe, str(path))


# --------------------------------------------------------------------------- tensors


def _lookup_table(recipe: Recipe) -> np.ndarray:
    """[256, 1, 3] float32 (cv2.LUT's layout): the normalised value of every uint8 level,
    per RGB channel.

    Computed with the reference's own float32 operations, so a gather through this table
    is bit-identical to normalising the pixels one by one.
    """
    levels = np.arange(256, dtype=np.float32)[:, None].repeat(3, axis=1)  # [256, 3]
    return np.ascontiguousarray(normalise_float(levels[None], recipe)[0][:, None, :])


def normalise_float(x: np.ndarray, recipe: Recipe) -> np.ndarray:
    """NHWC RGB -> NHWC RGB float32 normalised, in the reference's operation order."""
    mean = np.asarray(recipe.mean, dtype=np.float32)
    std = np.asarray(recipe.std, dtype=np.float32)
    x = x.astype(np.float32)
    if recipe.scale != 1.0:
        x = x / np.float32(recipe.scale)
    return (x - mean) / std


_LUTS: dict[str, np.ndarray] = {}


def to_tensor(batch: np.ndarray, recipe: Recipe) -> np.ndarray:
    """NHWC crops (uint8 or float32, RGB) -> contiguous NCHW float32 model input."""
    order = [2, 1, 0] if recipe.channels == "BGR" else [0, 1, 2]
    n, h, w, _ = batch.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    if batch.size == 0:
        return out
    if batch.dtype == np.uint8:
        lut = _LUTS.get(recipe.name)
        if lut is None:
            lut = _LUTS[recipe.name] = _lookup_table(recipe)
        # A table lookup and a split per image: the same float32 values as a numpy gather
        # over strided channels, and faster, with temporaries small enough to stay in cache.
        for i in range(n):
            planes = cv2.split(cv2.LUT(np.ascontiguousarray(batch[i]), lut))
            for dst, src in enumerate(order):
                out[i, dst] = planes[src]
    else:
        normed = normalise_float(batch, recipe)
        for dst, src in enumerate(order):
            out[:, dst] = normed[..., src]
    return out


def reference_tensor(path: str | Path, recipe: Recipe) -> np.ndarray:
    """One image's CHW float32 model input, exactly as the reference script writes it."""
    return to_tensor(load_crop(path, recipe)[None], recipe)[0]
