"""Command-line interface: parse arguments, call the Python API, print where things went.

Kept thin on purpose: every command maps onto one API function. User errors
(:class:`counterwarp.errors.CounterwarpError`) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from counterwarp.errors import CounterwarpError


def _shape(values: list[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)


def _cmd_synth(args: argparse.Namespace) -> None:
    from counterwarp.data.synthetic import synth

    manifest = synth(
        args.out,
        n=args.n,
        shape=_shape(args.shape),
        dim=args.dim,
        diseased_fraction=args.diseased_fraction,
        effect=args.effect,
        seed=args.seed,
        effect_spec=args.effect_spec,
    )
    print(f"cohort written to {Path(args.out)}  (manifest: {manifest})")


def _cmd_train_classifier(args: argparse.Namespace) -> None:
    from counterwarp.train.classifier import train_classifier

    metrics = train_classifier(
        args.manifest,
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        shape=_shape(args.shape),
        positive_label=args.positive_label,
    )
    test = metrics["test"]
    print(
        f"classifier test metrics: accuracy {test['accuracy']:.3f}, balanced accuracy "
        f"{test['balanced_accuracy']:.3f}, AUC {test['auc']:.3f} (n={test['n']})"
    )
    print(f"wrote {Path(args.out) / 'classifier.pt'}, classifier_metrics.json, split.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="counterwarp",
        description="Explain an image classifier by simulating the morphology it reads as disease.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="synthetic MRI cohort with ground-truth volume change")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=200, help="number of subjects (default 200)")
    p.add_argument("--shape", type=int, nargs="+", default=None,
                   help="image shape in voxels (default 32 32 32, or 64 64 with --dim 2)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3,
                   help="3 (volumes) or 2 (one coronal slice through the hippocampi)")
    p.add_argument("--diseased-fraction", type=float, default=0.5)
    p.add_argument("--effect", type=float, default=1.0, help="strength of the disease effect")
    p.add_argument("--effect-spec", type=Path, default=None,
                   help="JSON file describing the effect regions (default: ventricles + hippocampi)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train-classifier", help="train the paper's CNN on a manifest")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs="+", default=None,
                   help="resample/crop/pad every image to this shape")
    p.add_argument("--positive-label", default=None,
                   help="label value meaning 'diseased' when labels are strings")
    p.set_defaults(func=_cmd_train_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``counterwarp`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CounterwarpError as error:
        print(f"counterwarp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"counterwarp {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
