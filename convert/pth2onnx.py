"""pycls EfficientNet checkpoint -> verified ONNX for cardrunner.

The network comes from a pycls yaml (CONFIG) or a preset (--arch); the weights from a pycls
checkpoint (CKPT) or a seeded random init (--random-init).  Positionals are always in the
order CKPT, CONFIG, OUT, leaving out the ones the options replace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert.checkpoint import load_pycls_state, load_strict
from convert.config import PRESETS, ModelSpec, get_preset, load_pycls_yaml
from convert.efficientnet import build_effnet, init_random
from convert.export import (
    UsageError,
    add_export_options,
    export_verified,
    make_output_dir,
    run_cli,
    sha256_16,
)
from runner.preprocess import RECIPES, get_recipe

EPILOG = """\
forms:
  pth2onnx CKPT CONFIG OUT                  the guide's call: pycls checkpoint + pycls yaml
  pth2onnx CKPT OUT --arch EN-B3            checkpoint + built-in architecture
  pth2onnx CONFIG OUT --random-init         untrained weights (seed 0) for a yaml
  pth2onnx OUT --arch EN-B3 --random-init --seed 7

The export is checked with onnx.checker and compared with torch in ONNX Runtime (batches
2, 1 and 3); on failure the output file is removed.  Errors exit with status 2.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pth2onnx",
        usage="%(prog)s [options] [CKPT] [CONFIG] OUT",
        description="Convert a pycls EfficientNet checkpoint to a verified ONNX model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="[CKPT] [CONFIG] OUT: pycls checkpoint (.pyth), pycls yaml, output .onnx",
    )
    p.add_argument(
        "--arch", choices=sorted(PRESETS), help="built-in architecture instead of CONFIG"
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="untrained, deterministic weights instead of CKPT",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument(
        "--recipe",
        default="huawei",
        choices=sorted(RECIPES),
        help="preprocessing recipe recorded in the model (default huawei)",
    )
    add_export_options(p)
    return p


def _split_paths(args: argparse.Namespace) -> tuple[Path | None, Path | None, Path]:
    want = ["CKPT"] * (not args.random_init) + ["CONFIG"] * (args.arch is None) + ["OUT"]
    if len(args.paths) != len(want):
        raise UsageError(
            f"expected {' '.join(want)} with these options, got {len(args.paths)} path(s)"
        )
    named = dict(zip(want, map(Path, args.paths), strict=True))
    return named.get("CKPT"), named.get("CONFIG"), named["OUT"]


def convert(args: argparse.Namespace) -> None:
    """Build, load, export and verify; raises ValueError subclasses with one-line messages."""
    ckpt, config, out = _split_paths(args)
    make_output_dir(out)
    spec: ModelSpec = get_preset(args.arch) if args.arch else load_pycls_yaml(config)
    recipe = get_recipe(args.recipe)
    if recipe.crop != spec.crop:
        print(
            f"note: {spec.arch} was trained at {spec.crop} px; recipe {recipe.name} "
            f"feeds {recipe.crop} px",
            file=sys.stderr,
        )

    model = build_effnet(spec.effnet)
    if ckpt is None:
        init_random(model, args.seed, recipe.crop)
        weights = f"untrained (random init, seed {args.seed})"
    else:
        load_strict(model, load_pycls_state(ckpt))
        weights = f"checkpoint {ckpt.name} sha256:{sha256_16(ckpt)}"
    export_verified(model, out, args, recipe, spec.arch, weights)


def main(argv: list[str] | None = None) -> int:
    return run_cli("pth2onnx", convert, _parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
