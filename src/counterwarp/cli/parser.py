"""The argument parser: one sub-command per workflow, every option with its help, default
and, at the end of each command's ``--help``, a worked example."""

from __future__ import annotations

import argparse
from pathlib import Path

from counterwarp.cli.commands import (
    _cmd_benchmark,
    _cmd_demo,
    _cmd_ensemble,
    _cmd_explain,
    _cmd_fit,
    _cmd_group,
    _cmd_prepare,
    _cmd_report,
    _cmd_saliency,
    _cmd_sanity,
    _cmd_synth,
    _cmd_train_classifier,
)
from counterwarp.data.anatomy import ANATOMIES, DEFAULT_ANATOMY


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    """One option per setting of :data:`~counterwarp.train.config.SETTING_HELP`, typed,
    documented and with its default shown from FitConfig.

    The parsed default is None (only the options given reach :func:`_fit_settings`, the
    rest take FitConfig's defaults); the help shows FitConfig's default.
    """
    from counterwarp.train.config import CHOICES, SETTING_HELP, FitConfig

    defaults = FitConfig()
    for name, text in SETTING_HELP.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=text + shown)
            continue
        kind = float if default is None else type(default)  # margin: a float or None
        p.add_argument(flag, type=kind, default=None, choices=CHOICES.get(name),
                       help=text + shown)


def _add_stream_options(p: argparse.ArgumentParser, table: str) -> None:
    """``--shard`` and ``--workers`` of the commands that stream many images."""
    stem = table.rsplit(".", 1)[0]
    p.add_argument("--shard", default=None, metavar="I/N",
                   help=f"process only shard I of N (0-based; inputs I, I+N, I+2N, ...) for "
                        f"cluster array jobs; writes {stem}.shard-I-of-N.csv instead of "
                        f"{table}, so shards can share --out")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="background processes that read and preprocess the next images "
                        "(default 0: read in the main process)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless the help already says it, the option is
    required, or there is none to show) and keeps the epilog's example lines as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text or action.required or action.default is None
            or action.default is False or action.default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


#: One worked example per command, shown at the end of its ``--help``.
EXAMPLES: dict[str, str] = {
    "synth": "counterwarp synth --out cohort --n 200",
    "train-classifier": "counterwarp train-classifier --manifest cohort/manifest.csv --out run",
    "fit": "counterwarp fit --manifest cohort/manifest.csv --run run --steps 600",
    "explain": "counterwarp explain --run run --manifest cohort/manifest.csv --out run/explain",
    "saliency": "counterwarp saliency --run run --manifest cohort/manifest.csv "
                "--method gradient,occlusion --out run/saliency",
    "benchmark": "counterwarp benchmark --data cohort --run run --out run/benchmark",
    "group": "counterwarp group --run run --direction both --out run/group",
    "sanity": "counterwarp sanity --run run --out run/sanity",
    "ensemble": "counterwarp ensemble --run run --members 3",
    "report": "counterwarp report --run run",
    "prepare": "counterwarp prepare --input bids/ --label-column diagnosis --out prepared",
    "demo": "counterwarp demo --out runs/demo",
}


def _command(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=summary, description=summary, formatter_class=_HelpFormatter,
        epilog=f"example:\n  {EXAMPLES[name]}",
    )


def _classifier_options(p: argparse.ArgumentParser, fit: bool = False) -> None:
    """``--classifier SPEC``, ``--weights FILE``, ``--contract FILE``: a model counterwarp
    did not train (``fit`` records it in the run; the other commands use the run's)."""
    p.add_argument("--classifier", default=None, metavar="SPEC",
                   help="a classifier you trained: a TorchScript file, a torch.export .pt2 "
                        "file, or package.module:factory with --weights"
                        + (" (recorded in the run for the later commands)" if fit else
                           " (must be the one the run was fitted for; default: the run's)"))
    p.add_argument("--weights", type=Path, default=None, metavar="FILE",
                   help="state dict for --classifier module:factory (loaded weights-only)")
    p.add_argument("--contract", type=Path, default=None, metavar="FILE",
                   help="JSON input contract of --classifier: input_shape, channels, "
                        "intensity, orientation, output, class_index, unit, positive_label")


def _sanity_options(p: argparse.ArgumentParser, own_command: bool = True) -> None:
    """The options of ``sanity`` (``benchmark --sanity`` takes them too, but its images
    and saliency methods are the benchmark's)."""
    if own_command:
        p.add_argument("--manifest", type=Path, default=None,
                       help="images (default: the manifest in RUN/split.json)")
        p.add_argument("--saliency", default="all", metavar="METHODS",
                       help="saliency methods to randomise, comma-separated, or 'all'")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the randomisation, the refits and the oracle")
    p.add_argument("--max-images", type=int, default=16,
                   help="held-out images explained (healthy and diseased alternating)")
    p.add_argument("--simulator-stages", default="auto",
                   help="cascading stages that get a simulator refit (one fit each): "
                        "'auto' (stage 1 and the first stage whose randomised classifier "
                        "no longer tells the groups apart), a count K (stages 1 to K), or "
                        "stage numbers such as '1,3'")
    p.add_argument("--simulator-steps", type=int, default=None,
                   help="steps of each refit (default: the run's own)")
    p.add_argument("--no-seed-control", action="store_true",
                   help="skip the refit for the trained classifier with another seed")
    p.add_argument("--no-oracle", action="store_true",
                   help="skip the independent oracle classifier")
    p.add_argument("--oracle-epochs", type=int, default=20, help="oracle training epochs")
    p.add_argument("--compare-run", type=Path, default=None,
                   help="another run on the same grid (e.g. trained on another effect) "
                        "whose maps should differ")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    from counterwarp import __version__

    parser = argparse.ArgumentParser(
        prog="counterwarp", formatter_class=_HelpFormatter,
        description="Explain an image classifier by simulating the morphology it reads as disease.",
        epilog="Run `counterwarp COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"counterwarp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "synth", "synthetic MRI cohort with ground-truth volume change")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out that counterwarp did not write there")
    p.add_argument("--n", type=int, default=200, help="number of subjects")
    p.add_argument("--shape", type=int, nargs="+", default=None,
                   help="image shape in voxels (default 32 32 32, or 64 64 with --dim 2)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3,
                   help="3 (volumes) or 2 (one coronal slice through the hippocampi)")
    p.add_argument("--diseased-fraction", type=float, default=0.5,
                   help="share of subjects that carry the disease effect")
    p.add_argument("--effect", type=float, default=1.0, help="strength of the disease effect")
    p.add_argument("--effect-spec", type=Path, default=None,
                   help="JSON file of effect regions (default: ventricles + hippocampi)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the cohort")
    p.add_argument("--anatomy", choices=ANATOMIES, default=DEFAULT_ANATOMY,
                   help="the brain every subject is made from: the smooth MNI152 template "
                        "(nilearn) or Colin27, one real individual (Debian's mricron-data; "
                        "`make real-brain` installs it)")
    p.set_defaults(func=_cmd_synth)

    p = _command(sub, "train-classifier", "train the paper's CNN on a manifest")
    p.add_argument("--manifest", required=True, type=Path,
                   help="CSV with path,label (+ subject, covariates)")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="random seed of split and training")
    p.add_argument("--shape", type=int, nargs="+", default=None,
                   help="resample every image to this shape (default: the first image's)")
    p.add_argument("--positive-label", default=None,
                   help="label value meaning 'diseased' when labels are strings")
    p.add_argument("--negative-labels", default=None, metavar="VALUES",
                   help="comma-separated label values meaning 'healthy' beside "
                        "--positive-label (e.g. CN,HC); without it only CN/HC/NC/control/"
                        "healthy/normal/0 or the manifest's one other value count as healthy, "
                        "and any other value is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain a run folder that already holds a classifier (the new files "
                        "replace the old ones only when training completes)")
    p.set_defaults(func=_cmd_train_classifier)

    p = _command(sub, "fit", "fit the conditional warping simulator for a run's classifier")
    p.add_argument("--manifest", required=True, type=Path,
                   help="the manifest the classifier was trained on")
    p.add_argument("--run", required=True, type=Path, help="run folder with classifier.pt")
    p.add_argument("--split", default="train+val",
                   help="which parts of RUN/split.json to train on (train, val, test joined "
                        "with '+', or all)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--ensemble", type=int, default=1, metavar="K",
                   help="then fit K - 1 more simulators (seeds seed+1, ...) and write the "
                        "ensemble's mean and spread maps and seed-to-seed agreement to "
                        "RUN/ensemble")
    _classifier_options(p, fit=True)
    _add_fit_options(p)
    _device_option(p)
    p.set_defaults(func=_cmd_fit)

    p = _command(sub, "explain", "simulated images and volume-change maps per image")
    p.add_argument("--run", required=True, type=Path, help="run folder with simulator.pt")
    p.add_argument("--manifest", type=Path, default=None, help="images to explain (a CSV)")
    p.add_argument("--split", default="test", help="part of the split to explain")
    p.add_argument("images", nargs="*", type=Path, help="NIfTI images (instead of --manifest)")
    p.add_argument("--direction", choices=("remove", "inject", "both"), default="both",
                   help="remove: healthier; inject: more diseased")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--progression", type=int, default=0, metavar="N",
                   help="also write <id>_desc-<direction>_progression.gif with N frames along "
                        "x o exp(t v) (needs `fit --field velocity`; 0: none)")
    p.add_argument("--native", action="store_true",
                   help="also write every map in each subject's native scan space "
                        "(<id>_space-T1w_desc-<direction>_*.nii.gz), through the transform "
                        "`counterwarp prepare` recorded; needs its --manifest")
    _classifier_options(p)
    _add_stream_options(p, "summary.csv")
    p.set_defaults(func=_cmd_explain)

    p = _command(sub, "saliency", "classic saliency maps (Captum) of the run's classifier")
    p.add_argument("--run", required=True, type=Path, help="run folder with classifier.pt")
    p.add_argument("--method", required=True,
                   help="comma-separated: gradient, gradient_x_input, integrated_gradients, "
                        "smoothgrad, guided_backprop, gradcam, occlusion; or 'all'")
    p.add_argument("--manifest", type=Path, default=None, help="images to explain (a CSV)")
    p.add_argument("--split", default="test", help="part of the split to explain")
    p.add_argument("images", nargs="*", type=Path, help="NIfTI images (instead of --manifest)")
    p.add_argument("--occlusion-patch", type=int, default=4,
                   help="occlusion patch edge in model-grid voxels")
    _classifier_options(p)
    _device_option(p)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _add_stream_options(p, "saliency_index.csv")
    p.set_defaults(func=_cmd_saliency)

    p = _command(sub, "benchmark", "score the simulator and saliency maps against the truth "
                                   "of a `counterwarp synth` cohort")
    p.add_argument("--data", required=True, type=Path,
                   help="cohort folder from `counterwarp synth`")
    p.add_argument("--run", required=True, type=Path,
                   help="run folder with classifier.pt, split.json and simulator.pt")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--methods", default="all",
                   help="saliency baselines, comma-separated (gradient, gradient_x_input, "
                        "integrated_gradients, smoothgrad, guided_backprop, gradcam, "
                        "occlusion), or 'all'; the simulator is always scored")
    p.add_argument("--occlusion-patch", type=int, default=4,
                   help="occlusion patch edge in model-grid voxels")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="|true log volume change| above which a voxel counts as changed")
    p.add_argument("--sigma", type=float, default=1.5,
                   help="region-scale smoothing, in voxels")
    p.add_argument("--seed", type=int, default=0, help="seeds SmoothGrad's noise")
    p.add_argument("--sanity", action="store_true",
                   help="also run `counterwarp sanity` on the run, into OUT/sanity "
                        "(the --max-images ... --compare-run options are its)")
    _sanity_options(p, own_command=False)
    _classifier_options(p)
    _device_option(p)
    p.set_defaults(func=_cmd_benchmark)

    p = _command(sub, "ensemble", "fit more simulators with other seeds: mean and spread "
                                  "maps, per-region intervals, seed-to-seed agreement")
    p.add_argument("--run", required=True, type=Path, help="a fitted run folder (member 0)")
    p.add_argument("--members", type=int, default=3, help="ensemble size K")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/ensemble)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="images (default: the manifest in RUN/split.json)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of the new members (default: the run's)")
    p.add_argument("--atlas", type=Path, default=None,
                   help="label image for the region table (default: a synthetic cohort's "
                        "effect regions)")
    p.add_argument("--atlas-names", type=Path, default=None, help="CSV with label,name")
    p.set_defaults(func=_cmd_ensemble)

    p = _command(sub, "sanity", "sanity checks: cascading classifier randomisation, seed "
                                "control, an independent oracle classifier")
    p.add_argument("--run", required=True, type=Path,
                   help="run folder with a classifier and a fitted simulator")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _sanity_options(p)
    p.set_defaults(func=_cmd_sanity)

    p = _command(sub, "group", "group maps: mean, effect size, permutation FWE test, "
                 "FDR, region table with bootstrap intervals")
    p.add_argument("--run", type=Path, default=None, help="run folder (not needed with --maps)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--direction", choices=("inject", "remove", "both"), default="inject",
                   help="which simulator direction to map")
    p.add_argument("--maps", type=Path, default=None,
                   help="folder of maps already in one space (instead of the run's simulator)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="images to map (default: the one in RUN/split.json)")
    p.add_argument("--split", default="test", help="part of the split to map")
    p.add_argument("--subjects", choices=("auto", "all", "healthy", "diseased"),
                   default="auto", help="which subjects enter the group maps (auto: healthy "
                   "for inject, diseased for remove)")
    p.add_argument("--all-explanations", action="store_true",
                   help="also map invalid explanations (not moved past the margin, or folding)")
    p.add_argument("--permutations", type=int, default=1000,
                   help="sign flips of the FWE permutation test (and bootstrap resamples of "
                        "the region intervals); 0 skips them")
    p.add_argument("--seed", type=int, default=0, help="seed of the sign flips and bootstrap")
    p.add_argument("--atlas", type=Path, default=None,
                   help="label image for the region table (0 = no region)")
    p.add_argument("--atlas-names", type=Path, default=None, help="CSV with label,name")
    p.add_argument("--mask", type=Path, default=None, help="brain mask on the maps' grid")
    p.add_argument("--q", type=float, default=0.05, help="false discovery rate level")
    p.set_defaults(func=_cmd_group)

    p = _command(sub, "report", "self-contained HTML report of a run (RUN/report.html)")
    p.add_argument("--run", required=True, type=Path, help="run folder")
    p.add_argument("--out", type=Path, default=None, help="HTML file (default: RUN/report.html)")
    p.add_argument("--explain", type=Path, default=None, help="explain folder to reuse")
    p.add_argument("--saliency", type=Path, default=None, help="saliency folder to reuse")
    p.add_argument("--benchmark", type=Path, default=None, help="results.md or its folder")
    p.add_argument("--subjects", type=int, default=4, help="held-out subjects to show")
    p.add_argument("--no-compute", action="store_true",
                   help="only embed what exists; compute nothing missing")
    _classifier_options(p)
    p.set_defaults(func=_cmd_report)

    p = _command(sub, "prepare", "native T1 scans -> skull-stripped, registered to MNI152, on "
                                 "the model grid, with a manifest")
    p.add_argument("--input", required=True, type=Path,
                   help="a folder of NIfTI scans, a manifest CSV (path,label,...) or a BIDS "
                        "dataset (participants.tsv + sub-*/anat/*_T1w.nii.gz)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--skull-strip", choices=("deepbet", "none"), default="deepbet",
                   help="brain extraction (deepbet, its model inside the package), or none for "
                        "scans that are skull-stripped already")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="model grid in voxels (default 32 32 32; with --voxel-size alone, "
                        "derived from the template brain's extent)")
    p.add_argument("--voxel-size", type=float, default=None, metavar="MM",
                   help="isotropic voxel size in mm (default: the smallest that fits the "
                        "template brain in --shape)")
    p.add_argument("--label-column", default=None, metavar="COLUMN",
                   help="the column holding the label (participants.tsv for BIDS, the CSV's "
                        "for a manifest; default: label)")
    p.set_defaults(func=_cmd_prepare)

    p = _command(sub, "demo", "synth -> train-classifier -> fit -> explain -> report, on "
                              "embedded data")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder")
    p.add_argument("--quick", action="store_true", help="2D, small: ends within 2 minutes")
    p.set_defaults(func=_cmd_demo)
    return parser


