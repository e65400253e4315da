"""Time to quality: how long a simulator fit takes to reach a fixed quality, per variant.

A variant that is faster per step but needs more steps, or ends worse, is not faster. So
every variant is fitted on the same cohort and classifier, and every ``--eval-every``
seconds of training the fit pauses (the pause is not counted) and is scored on the
held-out test subjects with the benchmark's own scorer (``explain.assess``):

- ``region``: Pearson of the mean "inject" log volume change of the healthy test subjects
  against the true effect, both smoothed within the brain (region scale); ``voxel``: the
  same without smoothing;
- ``moved_inject`` / ``moved_remove``: shares of the test subjects moved past the margin in
  their asked direction (inject on those the classifier calls healthy, remove on the
  others); ``folding``: mean share of folded voxels.

A point *reaches quality* when ``region >= --target-region`` and both moved shares are at
least ``--target-moved``; the variant's time to quality is its first such point's training
time. The region scale is the same in millimetres on every grid: ``--sigma`` voxels at
32^3, scaled with the grid's edge (3 voxels at 64^3).

Writes ``OUT/time_to_quality.json`` (every point of every curve), ``OUT/time_to_quality.md``
(one row per variant and seed, and the curves) and ``OUT/curves.png``.

Usage (a cohort and a classifier run from ``counterwarp synth`` / ``train-classifier``)::

    OMP_NUM_THREADS=2 python benchmarks/time_to_quality.py --data COHORT --run RUN \\
        --out runs/ttq --variants full,default --seeds 0,1 --budget-s 600
    # smoke test, seconds (makes its own tiny cohort and classifier):
    python benchmarks/time_to_quality.py --out /tmp/ttq --n 24 --shape 16 16 16 --epochs 1 \\
        --budget-s 5 --eval-every 2 --variants full,default --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from counterwarp._io import write_json_atomic, write_text_atomic
from counterwarp.data.truth import load_cohort_truth
from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import explain_directions_in_batches
from counterwarp.explain.simulator import Simulator
from counterwarp.nn.classifier import predict_in_batches
from counterwarp.stats.scores import pearson, smooth
from counterwarp.train.config import FitConfig
from counterwarp.train.simulator import fit_simulator
from counterwarp.workflows.folder import (
    load_images,
    load_run_classifier,
    model_shape,
    rows_in_split,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import cohort_parser, prepare  # noqa: E402  (a sibling script)

#: name -> (what it is, FitConfig overrides on top of the product's defaults)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("the product's defaults (FitConfig)", {}),
    "full": ("the field at full resolution, float32 (the paper's head)",
             {"field_downsize": 1, "precision": "fp32"}),
    "half": ("the field at half resolution, float32", {"field_downsize": 2, "precision": "fp32"}),
    "half+bf16": ("the field at half resolution, bf16 forward passes",
                  {"field_downsize": 2, "precision": "bf16"}),
    "quarter+bf16": ("the field at quarter resolution, bf16 forward passes",
                     {"field_downsize": 4, "precision": "bf16"}),
    "full+bf16": ("the field at full resolution, bf16 forward passes",
                  {"field_downsize": 1, "precision": "bf16"}),
    "cosine": ("the defaults with a cosine learning-rate decay over --steps",
               {"lr_schedule": "cosine"}),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = cohort_parser(__doc__.split("\n\n")[0], n=200, dim=3, shape=[64, 64, 64], epochs=30)
    p.add_argument("--variants", default="full,default",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated fit seeds")
    p.add_argument("--steps", type=int, default=600, help="most steps per fit")
    p.add_argument("--batch-size", type=int, default=None, help="default: FitConfig's")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="stop a fit after this many seconds of training")
    p.add_argument("--eval-every", type=float, default=60.0,
                   help="score the fit every this many seconds of training")
    p.add_argument("--target-region", type=float, default=0.90)
    p.add_argument("--target-moved", type=float, default=0.95)
    p.add_argument("--sigma", type=float, default=1.5,
                   help="region scale in voxels of a 32^3 grid (scaled with the grid)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


class Scorer:
    """Scores a network in training on the held-out test subjects (eval mode, then back)."""

    def __init__(self, data: Path, run: Path, sigma: float, device: Any) -> None:
        classifier, payload = load_run_classifier(run)
        shape = model_shape(payload)
        rows = rows_in_split(run, data / "manifest.csv", "test")
        self.images, self.labels = load_images(rows, shape, progress=False)
        truth = load_cohort_truth(data, rows, shape)
        self.effect, self.mask = truth.effect, truth.template_mask
        self.sigma = sigma * shape[0] / 32
        self.classifier = classifier.to(device) if device else classifier
        self.shape = shape

    def __call__(self, net: torch.nn.Module, margin: float) -> dict[str, float]:
        simulator = Simulator()
        simulator.net_, simulator.classifier_, simulator.margin_ = net, self.classifier, margin
        was_training = net.training
        try:
            explained = explain_directions_in_batches(
                simulator, self.images, ("inject", "remove"), batch_size=8
            )
            inject, remove = explained["inject"], explained["remove"]
        finally:
            net.train(was_training)
        diseased = inject.logit_before > 0
        healthy = (self.labels == 0).numpy()
        mean_change = inject.log_volume_change.numpy()[healthy].mean(0)
        region = pearson(smooth(mean_change, self.sigma, self.mask),
                         smooth(self.effect, self.sigma, self.mask), self.mask)
        return {
            "voxel": pearson(mean_change, self.effect, self.mask),
            "region": region,
            "moved_inject": float(inject.moved[~diseased].float().mean()),
            "moved_remove": float(remove.moved[diseased].float().mean()),
            "folding": float(torch.cat([inject.folding, remove.folding]).mean()),
        }


class _Budget(Exception):
    """Raised from the step callback to end a fit whose time budget is spent."""


def fit_curve(
    name: str, seed: int, args: argparse.Namespace, scorer: Scorer, train: torch.Tensor,
    classifier: torch.nn.Module,
) -> dict[str, Any]:
    """Fit one variant with one seed; its quality curve over training time."""
    overrides = dict(VARIANTS[name][1])
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    config = dataclasses.replace(FitConfig(), steps=args.steps, seed=seed, **overrides)
    points: list[dict[str, float]] = []
    state = {"paused": 0.0, "next": args.eval_every, "started": time.perf_counter(),
             "net": None, "margin": None}

    def score(step: int) -> None:
        paused = time.perf_counter()
        trained = paused - state["started"] - state["paused"]
        values = scorer(state["net"], state["margin"])
        points.append({"step": step, "train_s": trained, **values})
        print(f"  {name} seed {seed} step {step} {trained:.0f} s: region {values['region']:.3f} "
              f"voxel {values['voxel']:.3f} moved {values['moved_inject']:.2f}/"
              f"{values['moved_remove']:.2f}", flush=True)
        state["paused"] += time.perf_counter() - paused

    def on_step(step: int, values: dict[str, float]) -> None:
        trained = time.perf_counter() - state["started"] - state["paused"]
        if trained >= state["next"] or step == config.steps or trained >= args.budget_s:
            score(step)
            state["next"] = trained + args.eval_every
        if trained >= args.budget_s:
            raise _Budget

    logits = predict_in_batches(classifier, train)  # the margin fit_simulator derives
    state["margin"] = config.margin or config.margin_sd * float(logits.std())
    net_holder = _NetCapture(state)
    try:
        fit_simulator(classifier, train, config, progress=args.progress, device=args.device,
                      on_step=on_step, net_factory=net_holder)
    except _Budget:
        pass
    return {"variant": name, "seed": seed, "config": config.to_dict(), "points": points}


class _NetCapture:
    """A ``net_factory`` that builds the default network and hands it to the scorer."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        from counterwarp.nn.simulator import SimulatorNet

        net = SimulatorNet(*args, **kwargs)
        self.state["net"] = net
        return net


def time_to_quality(curve: dict[str, Any], args: argparse.Namespace) -> float | None:
    """Training seconds of the first point that reaches quality (None: never)."""
    for point in curve["points"]:
        if (point["region"] >= args.target_region
                and min(point["moved_inject"], point["moved_remove"]) >= args.target_moved):
            return point["train_s"]
    return None


def markdown(curves: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    """The result table and every curve."""
    lines = [
        "# Time to quality", "",
        f"Cohort `{info['data']}`, classifier `{info['run']}`, grid {info['shape']}, "
        f"{info['n_train']} training and {info['n_test']} test subjects; torch threads "
        f"{torch.get_num_threads()}. Quality: region r >= {args.target_region} (sigma "
        f"{info['sigma_voxels']:.2f} voxels) and moved >= {args.target_moved} both ways. "
        f"Budget {args.budget_s:.0f} s of training per fit, scored every "
        f"{args.eval_every:.0f} s.", "",
        "| variant | seed | s/step | steps | time to quality s | final region r | "
        "final voxel r | moved inject | moved remove | folding % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for curve in curves:
        last = curve["points"][-1] if curve["points"] else None
        if last is None:
            continue
        reached = time_to_quality(curve, args)
        lines.append(
            f"| {curve['variant']} | {curve['seed']} | {last['train_s'] / last['step']:.2f} | "
            f"{last['step']} | {'-' if reached is None else f'{reached:.0f}'} | "
            f"{last['region']:.3f} | {last['voxel']:.3f} | {last['moved_inject']:.2f} | "
            f"{last['moved_remove']:.2f} | {100 * last['folding']:.3f} |"
        )
    lines += ["", "Curves (training seconds: region r, voxel r, moved inject / remove):", ""]
    for curve in curves:
        points = "; ".join(
            f"{p['train_s']:.0f} s: {p['region']:.2f}, {p['voxel']:.2f}, "
            f"{p['moved_inject']:.2f}/{p['moved_remove']:.2f}" for p in curve["points"]
        )
        lines.append(f"- {curve['variant']} seed {curve['seed']}: {points}")
    return "\n".join(lines) + "\n"


def plot(curves: list[dict[str, Any]], path: Path, target: float) -> None:
    """Region r over training time, one line per variant and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for curve in curves:
        xs = [p["train_s"] / 60 for p in curve["points"]]
        ax.plot(xs, [p["region"] for p in curve["points"]], marker="o",
                label=f"{curve['variant']} (seed {curve['seed']})")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("inject vs truth, region scale (Pearson r)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        data, run = prepare(args)
        classifier, payload = load_run_classifier(run)
        shape = model_shape(payload)
        train_rows = rows_in_split(run, data / "manifest.csv", "train+val")
        train, _ = load_images(train_rows, shape, progress=False)
        scorer = Scorer(data, run, args.sigma, args.device)
    except CounterwarpError as error:
        print(f"time_to_quality: {error}", file=sys.stderr)
        return 2
    info = {"data": str(data), "run": str(run), "shape": list(shape), "n_train": len(train),
            "n_test": len(scorer.images), "sigma_voxels": scorer.sigma}
    curves = []
    for name in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            print(f"{name} seed {seed}: {VARIANTS[name][0]}", flush=True)
            curves.append(fit_curve(name, seed, args, scorer, train, classifier))
            report = {"info": info, "target_region": args.target_region,
                      "target_moved": args.target_moved, "curves": curves}
            write_json_atomic(args.out / "time_to_quality.json", report)
            write_text_atomic(args.out / "time_to_quality.md", markdown(curves, args, info))
    plot(curves, args.out / "curves.png", args.target_region)
    print(markdown(curves, args, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
