"""The `fastprompt` command line. Each subcommand lives in its own small function."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(
        method=args.method,
        backbone=args.backbone,
        pretrained=args.pretrained,
        epochs=args.epochs,
        shots=args.shots,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
    )
    if result["accuracy"] <= result["chance"]:
        print("warning: the run did not beat chance", file=sys.stderr)
        return 1
    return 0


def _info(args) -> int:
    from .info import main as info_main

    info_main()
    return 0


def _prepare(args) -> int:
    from .data import check_layout

    report = check_layout(args.dataset, args.root, verify_images=args.verify)
    print(report.format())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = argparse.ArgumentParser(prog="fastprompt", description="Fast prompt learning on frozen CLIP.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and evaluate a method on the embedded procedural dataset")
    demo.add_argument("--method", default="maple", choices=sorted(METHODS))
    demo.add_argument("--backbone", default="small", help="'small', 'tiny' or an open_clip model name")
    demo.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file")
    demo.add_argument("--epochs", type=int, default=6)
    demo.add_argument("--shots", type=int, default=16)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--lr", type=float, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="devices, versions and kernel backends")
    info.set_defaults(func=_info)

    prepare = sub.add_parser("prepare", help="check a dataset layout and report what is missing or corrupt")
    prepare.add_argument("dataset")
    prepare.add_argument("--root", required=True)
    prepare.add_argument("--verify", default="sample", choices=["sample", "all", "none"])
    prepare.set_defaults(func=_prepare)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
