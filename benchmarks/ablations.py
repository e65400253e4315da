"""Ablations of the simulator: which design choices make it work, and how reliably, over
several seeds.

One classifier (trained once, or taken from ``--run``) is explained by simulators that differ
from the default (one CondConv U-Net predicting one antisymmetric displacement field, cycle
loss on) in one choice each:

    (a) two      two separate unconditional simulators (``TwoSimulators``: one net per
                 direction, one expert per layer, routing on the constant condition), same
                 losses, batches, steps and data; the cycle goes through the other net
    (b) velocity stationary velocity field integrated by scaling and squaring (diffeomorphic)
    (c) nocycle  no cycle-consistency loss (``w_cycle = 0``)
    (d) routing  CondConv routing on the condition alone instead of features + condition,
                 in the paper's conditional form (with the default antisymmetric form the
                 condition never reaches the routing, so the question only exists there)
    (e) conditional  the paper's conditional simulator: the condition enters every layer and
                 the network predicts the inject and the remove field separately. The
                 default is antisymmetric instead: one field g(x) predicted without the
                 condition, inject warps with g and remove with -g

Every configuration is fitted with each seed on the classifier's train+val images and
evaluated on its held-out test images (``counterwarp.workflows.benchmark``): share moved past
the margin, flips, mean logit shifts, relative cycle error, folding share, mean |grad u|,
and agreement with the known truth (group Pearson of the negated "remove" maps vs the
effect, voxel-wise and smoothed; subject median Pearson; mean "inject" over healthy
subjects vs the effect). A run *fails* when fewer than half of the held-out images
move past the margin in their asked direction, or when more than 0.5 % of voxels fold
(mean over images and directions).

Writes ``OUT/ablations.md`` (mean +- sd over seeds and the failure count per
configuration), ``OUT/ablations.csv`` (one row per configuration x seed) and
``OUT/ablations.json``; the cohort and classifier it made, if any, go to ``OUT/cohort`` and
``OUT/run``.

Usage (sizes are flags). The defaults are sized for a 2-core CPU: the default run (6
configurations x 3 seeds x 300 steps at 64x64) took 17 min on one shared core of this
machine, plus 1-2 min for the cohort and the classifier (results in
``benchmarks/results/ablations-2d-intel-xeon-2c.md``)::

    OMP_NUM_THREADS=2 python benchmarks/ablations.py --out runs/ablations
    # a given cohort and classifier run (from `counterwarp synth` / `train-classifier`):
    python benchmarks/ablations.py --out runs/abl --data runs/cohort --run runs/run
    # smoke test, seconds:
    OMP_NUM_THREADS=1 python benchmarks/ablations.py --out /tmp/abl --n 24 --shape 32 32 \\
        --epochs 2 --steps 4 --channels 4 8 8 --latent-dim 16 --seeds 2

For (a), ``fit_simulator(net_factory=TwoSimulators)`` builds the two separate simulators.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from counterwarp._io import write_json_atomic, write_text_atomic
from counterwarp.data.truth import load_cohort_truth
from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import explain_in_batches, simulator_metrics
from counterwarp.explain.simulator import Simulator
from counterwarp.nn.two_simulators import TwoSimulators
from counterwarp.stats.benchmark_scores import score_methods
from counterwarp.train.config import FitConfig
from counterwarp.train.simulator import fit_simulator
from counterwarp.workflows.folder import (
    load_images,
    load_run_classifier,
    model_shape,
    rows_in_split,
)

#: name -> (label, FitConfig overrides, two separate simulators?)
CONFIGURATIONS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "default": ("one simulator, antisymmetric field (CondConv, default)", {}, False),
    "two": ("(a) two separate unconditional simulators", {}, True),
    "velocity": ("(b) velocity field instead of displacement", {"field": "velocity"}, False),
    "nocycle": ("(c) without the cycle loss", {"w_cycle": 0.0}, False),
    "routing": (
        "(d) routing on the condition alone (conditional form)",
        {"routing": "condition", "antisymmetric": False}, False,
    ),
    "conditional": (
        "(e) the paper's conditional form: both fields predicted (antisymmetric off)",
        {"antisymmetric": False}, False,
    ),
}
ARMS = {"a": "two", "b": "velocity", "c": "nocycle", "d": "routing", "e": "conditional"}
MOVED_MIN = 0.5
FOLDING_MAX = 0.005
#: (key, column title, scale) of the table; values are mean +- sd over seeds.
COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("moved_share", "moved past margin", 1.0),
    ("flip_share", "flips", 1.0),
    ("mean_logit_shift_remove", "logit shift remove", 1.0),
    ("mean_logit_shift_inject", "logit shift inject", 1.0),
    ("cycle_error_relative", "cycle error (rel.)", 1.0),
    ("folding_share_mean", "folding %", 100.0),
    ("mean_abs_grad_u", "mean \\|grad u\\|", 1.0),
    ("group_pearson", "group r (-remove)", 1.0),
    ("group_pearson_smoothed", "group r smoothed (-remove)", 1.0),
    ("subject_median_pearson", "subject median r (-remove)", 1.0),
    ("inject_healthy_pearson_voxel", "inject-healthy r voxel", 1.0),
    ("inject_healthy_pearson_region", "inject-healthy r region", 1.0),
    ("fit_seconds", "fit s", 1.0),
)


def cohort_parser(
    description: str, *, n: int, dim: int, shape: list[int], epochs: int
) -> argparse.ArgumentParser:
    """A parser with the flags of the cohort and classifier a benchmark uses or makes
    (``--out``, ``--data``, ``--run``, and ``--n`` ... ``--epochs`` for new ones, with
    these defaults), ``--device`` and ``--progress``; :func:`prepare` reads them."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--data", type=Path, default=None,
                   help="cohort from `counterwarp synth` (default: make one in OUT/cohort)")
    p.add_argument("--run", type=Path, default=None,
                   help="run folder with classifier.pt and split.json for --data "
                        "(default: train one in OUT/run)")
    p.add_argument("--n", type=int, default=n, help="subjects of a new cohort")
    p.add_argument("--dim", type=int, choices=(2, 3), default=dim, help="dims of a new cohort")
    p.add_argument("--shape", type=int, nargs="+", default=shape,
                   help=f"grid of a new cohort (default {' '.join(map(str, shape))})")
    p.add_argument("--cohort-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=epochs, help="epochs of a new classifier")
    p.add_argument("--device", default=None)
    p.add_argument("--progress", action="store_true", help="progress bars per fit")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = cohort_parser(__doc__.split("\n\n")[0], n=160, dim=2, shape=[64, 64], epochs=20)
    p.add_argument("--arms", default="a,b,c,d,e",
                   help="ablations to run besides the default, comma-separated from a,b,c,d,e")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (>= 1)")
    p.add_argument("--steps", type=int, default=300, help="simulator steps per fit")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--channels", type=int, nargs="+", default=None,
                   help="simulator widths (default: FitConfig's)")
    p.add_argument("--latent-dim", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--sigma", type=float, default=1.5, help="region scale, voxels")
    p.add_argument("--threshold", type=float, default=0.05, help="|truth| of changed voxels")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The cohort and classifier run to use, made in OUT when not given."""
    if args.run is not None and args.data is None:
        raise CounterwarpError("--run needs --data (the cohort its classifier was trained on)")
    data = args.data
    if data is None:
        from counterwarp.data.synthetic import synth

        data = args.out / "cohort"
        synth(data, n=args.n, dim=args.dim, shape=tuple(args.shape), seed=args.cohort_seed)
    run = args.run
    if run is None:
        from counterwarp.train.classifier import train_classifier

        run = args.out / "run"
        metrics = train_classifier(data / "manifest.csv", run, epochs=args.epochs,
                                   progress=args.progress, device=args.device)
        print(f"classifier: test accuracy {metrics['test']['accuracy']:.3f}", flush=True)
    return Path(data), Path(run)


def evaluate(
    simulator: Simulator, images: torch.Tensor, labels: torch.Tensor, truth: Any,
    sigma: float, threshold: float,
) -> dict[str, Any]:
    """Behaviour and truth agreement of one fitted simulator on held-out images."""
    metrics = simulator_metrics(simulator, images, labels, truth.effect, truth.template_mask,
                                sigma=sigma)
    change = -explain_in_batches(simulator, images, "remove").log_volume_change.numpy()
    brains = images[:, 0].numpy() != 0
    scores = score_methods({"simulator_remove": change}, truth.truths, brains, truth.effect,
                           truth.template_mask, ids=truth.ids, threshold=threshold,
                           sigma=sigma)["simulator_remove"]
    flips = metrics["remove_flips"] + metrics["inject_flips"]
    return {
        **metrics,
        "flip_share": flips / max(1, metrics["n"]),
        "group_pearson": scores["group"]["pearson"],
        "group_pearson_smoothed": scores["group"]["pearson_smoothed"],
        "group_auroc": scores["group"]["auroc"],
        "subject_median_pearson": scores["subject_median"]["pearson"],
        "inject_healthy_pearson_voxel": metrics.get("inject_truth_pearson_voxel"),
        "inject_healthy_pearson_region": metrics.get("inject_truth_pearson_region"),
    }


def failed(metrics: dict[str, Any]) -> bool:
    """No movement past the margin for the majority, or folding above 0.5 %."""
    moved = metrics.get("moved_share")
    return (moved is None or moved < MOVED_MIN
            or metrics["folding_share_mean"] > FOLDING_MAX)


def fit_one(
    name: str, seed: int, args: argparse.Namespace, classifier: torch.nn.Module,
    train_images: torch.Tensor,
) -> tuple[Simulator, float]:
    """Fit configuration ``name`` with ``seed``; returns the simulator and seconds taken."""
    _, overrides, two = CONFIGURATIONS[name]
    settings: dict[str, Any] = {"steps": args.steps, "batch_size": args.batch_size,
                                "seed": seed, "checkpoint_every": max(1, args.steps),
                                **overrides}
    for flag, key in (("channels", "channels"), ("latent_dim", "latent_dim"), ("lr", "lr")):
        value = getattr(args, flag)
        if value is not None:
            settings[key] = tuple(value) if flag == "channels" else value
    config = FitConfig.from_dict(settings)
    started = time.perf_counter()
    result = fit_simulator(classifier, train_images, config, progress=args.progress,
                           device=args.device, net_factory=TwoSimulators if two else None)
    seconds = time.perf_counter() - started
    simulator = Simulator(**config.to_dict())
    simulator.net_ = result.net.cpu()
    simulator.classifier_ = classifier.cpu()
    simulator.margin_ = result.margin
    simulator.logit_mean_, simulator.logit_std_ = result.logit_mean, result.logit_std
    simulator.history_ = result.history
    return simulator, seconds


def _mean_sd(values: Sequence[float | None]) -> str:
    """``"mean ± sd"`` (sample sd) of the finite values, ``"mean"`` for one, ``"-"`` for none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    mean = float(np.mean(finite))
    if len(finite) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {float(np.std(finite, ddof=1)):.3f}"


def table(runs: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown table: one row per configuration, mean ± sd over its seeds."""
    header = ["configuration", "parameters", "seeds", "failures"] + [
        title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(COLUMNS)]
    for name in names:
        mine = [r for r in runs if r["configuration"] == name]
        cells = [CONFIGURATIONS[name][0], str(mine[0]["parameters"]) if mine else "-",
                 str(len(mine)),
                 str(sum(bool(r["failed"]) for r in mine))]
        for key, _, scale in COLUMNS:
            values = [None if r.get(key) is None else scale * float(r[key]) for r in mine]
            cells.append(_mean_sd(values))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv(runs: list[dict[str, Any]]) -> str:
    import csv
    import io

    keys = ["configuration", "seed", "failed", "parameters"] + [k for k, _, _ in COLUMNS] + [
        "remove_moved_share", "inject_moved_share", "group_auroc", "margin", "n"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for run in runs:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                         for k, v in run.items() if k in keys})
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ablations; returns the exit status (2 on a user error)."""
    args = parse_args(argv)
    try:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in arms if a not in ARMS]
        if unknown or args.seeds < 1:
            raise CounterwarpError(f"--arms takes letters from a,b,c,d,e (got {args.arms!r}); "
                                   f"--seeds must be >= 1 (got {args.seeds})")
        names = ["default"] + [ARMS[a] for a in arms]
        data, run = prepare(args)
        classifier, payload = load_run_classifier(run)
        shape = model_shape(payload)
        label = payload.get("positive_label")
        train_rows = rows_in_split(run, data / "manifest.csv", "train+val", positive_label=label)
        test_rows = rows_in_split(run, data / "manifest.csv", "test", positive_label=label)
        truth = load_cohort_truth(data, test_rows, shape)
        train_images, _ = load_images(train_rows, shape, progress=False)
        test_images, test_labels = load_images(test_rows, shape, progress=False)
        runs: list[dict[str, Any]] = []
        for name in names:
            for seed in range(args.seeds):
                simulator, seconds = fit_one(name, seed, args, classifier, train_images)
                metrics = evaluate(simulator, test_images, test_labels, truth, args.sigma,
                                   args.threshold)
                assert simulator.net_ is not None
                record = {"configuration": name, "seed": seed, "fit_seconds": seconds,
                          "parameters": sum(p.numel() for p in simulator.net_.parameters()),
                          **metrics}
                record["failed"] = failed(record)
                runs.append(record)
                print(f"{name:9s} seed {seed}: moved {_mean_sd([record['moved_share']])}, "
                      f"group r {_mean_sd([record['group_pearson']])}, failed "
                      f"{record['failed']}, {seconds:.0f} s", flush=True)
    except CounterwarpError as error:
        print(f"ablations: error: {error}", file=sys.stderr)
        return 2
    text = "\n".join([
        "# Simulator ablations",
        "",
        f"Cohort `{data}`, classifier `{run}`; {len(train_images)} training and "
        f"{len(test_images)} held-out images, grid {list(shape)}; {args.steps} steps, batch "
        f"{args.batch_size}, seeds 0..{args.seeds - 1}. Mean ± sd over seeds. A run fails "
        f"when fewer than {MOVED_MIN:.0%} of the held-out images move past the margin in "
        f"their asked direction, or when more than {FOLDING_MAX:.1%} of voxels fold. 'group "
        f"r (-remove)': Pearson of the mean negated 'remove' volume change over the held-out "
        f"subjects with the template-space effect (signed), voxel-wise and smoothed "
        f"(sigma {args.sigma} voxels).",
        "",
        table(runs, names),
        "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "ablations.md", text)
    write_text_atomic(args.out / "ablations.csv", _csv(runs))
    write_json_atomic(args.out / "ablations.json", {
        "data": str(data), "run": str(run), "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [{k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                  for k, v in r.items()} for r in runs],
    })
    print(text)
    print(f"wrote {args.out / 'ablations.md'}, ablations.csv, ablations.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
