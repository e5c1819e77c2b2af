"""The ``hf-clafusion`` command line (the only argument parser in the package).

Exit codes: 0 success, 2 usage error, 1 any other failure (one line on stderr; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from .errors import ClaFusionError


EPILOG = """examples:
  hf-clafusion demo                              # digits: MLP and CNN pairs, fused and finetuned
  hf-clafusion demo --dataset fashion-mnist      # needs `apt-get install dataset-fashion-mnist`
  hf-clafusion demo --output ./demo-out --seed 1
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-clafusion",
        description="Fuse trained neural networks of different depths and widths (CLAFusion).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-clafusion {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train, fuse and finetune MLP and CNN pairs on real data (no download)",
        description="Train two MLPs (hidden 400-200-100-50-25 vs 400-200-100) and two VGG-style CNNs of different "
        "depth, fuse each pair with CLAFusion, finetune briefly, print the accuracy table and save the fused models "
        "and alignment plots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits")
    demo.add_argument("--output", default="clafusion-demo", help="folder for fused models and plots")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="fewer training epochs (a smoke run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.dataset, args.output, seed=args.seed, quick=args.quick)
        return 0
    except ClaFusionError as error:
        if args.debug:
            raise
        print(f"hf-clafusion: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hf-clafusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
