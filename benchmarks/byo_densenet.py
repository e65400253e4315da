"""A classifier counterwarp did not define, explained end to end beside the paper's CNN.

On the default 3D cohort (``counterwarp synth``: 200 subjects, 32^3, seed 0) this script

1. trains the paper's CNN with ``counterwarp train-classifier`` (run ``OUT/cnn``), which
   draws the subject-level split;
2. trains a MONAI ``DenseNet121`` (spatial_dims 3, one logit) on the *same* training part,
   with the same augmentation, epochs, optimiser and selection rule (the last epoch), saves
   it as TorchScript with its contract, and reports its held-out balanced accuracy;
3. fits the simulator for each classifier from the command line with the default settings
   (``counterwarp fit``; the DenseNet run gets the CNN's ``split.json``, so both are
   explained on the same held-out subjects) and scores both with ``counterwarp benchmark``
   (the same scorer): share moved past the margin each way, folding, inject vs truth on
   healthy held-out subjects (voxel, region scale), and the saliency baselines.

Writes ``OUT/byo_densenet.json`` and ``OUT/byo_densenet.md`` (the table in
docs/benchmarks.md). Usage::

    OMP_NUM_THREADS=2 python benchmarks/byo_densenet.py --out runs/byo-densenet
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from counterwarp.cli import main as cli
from counterwarp.data.manifest import ManifestDataset, read_manifest
from counterwarp.train.augment import augment_batch, augmentation_settings
from counterwarp.train.common import balanced_accuracy


def _train_densenet(cohort: Path, split: dict, epochs: int, seed: int) -> tuple[torch.nn.Module,
                                                                                 dict]:
    """DenseNet121 trained on the split's train part; balanced accuracy per part."""
    from monai.networks.nets import DenseNet121

    rows = read_manifest(cohort / "manifest.csv")
    by_path = {str(row.path): row for row in rows}
    parts = {name: [by_path[str(Path(item["path"]).resolve())] for item in split[name]]
             for name in ("train", "val", "test")}
    data = {name: ManifestDataset(part, cache=True) for name, part in parts.items()}
    images = {name: torch.stack([d[i][0] for i in range(len(d))]) for name, d in data.items()}
    labels = {name: torch.tensor([float(r.label) for r in part]) for name, part in parts.items()}
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs,
                                                          eta_min=1e-5)
    n_positive = float(labels["train"].sum())
    loss_of = torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor((len(labels["train"]) - n_positive) / n_positive))
    augment = augmentation_settings(None)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels["train"]), generator=generator)
        loss = torch.tensor(float("nan"))
        for start in range(0, len(order), 16):
            batch = order[start:start + 16]
            if len(batch) < 2 or (len(order) > 16 and len(batch) < 16):
                continue  # drop the last partial batch, as train-classifier does
            x = augment_batch(images["train"][batch], generator, **augment)
            optimiser.zero_grad()
            loss = loss_of(model(x)[:, 0], labels["train"][batch])
            loss.backward()
            optimiser.step()
        schedule.step()
        print(f"densenet epoch {epoch + 1}/{epochs}: loss {float(loss):.3f}", flush=True)
    model.eval()
    metrics = {}
    with torch.no_grad():
        for name in ("train", "val", "test"):
            logits = torch.cat([model(images[name][i:i + 16])[:, 0]
                                for i in range(0, len(labels[name]), 16)])
            metrics[name] = {
                "balanced_accuracy": balanced_accuracy((logits > 0).numpy(),
                                                       labels[name].numpy()),
                "n": len(labels[name]),
            }
    return model, metrics


def _benchmark_row(result: dict) -> dict:
    sim, inject = result["simulator"], result["inject_vs_truth_healthy"]
    methods = result["methods"]
    best = max((m for m in methods if not m.startswith("simulator")),
               key=lambda m: methods[m]["group"].get("pearson_smoothed") or -1)
    return {
        "moved_remove": sim.get("remove_moved_share"),
        "moved_inject": sim.get("inject_moved_share"),
        "folding": sim.get("folding_share_mean"),
        "inject_vs_truth_voxel": inject["pearson_voxel"],
        "inject_vs_truth_region": inject["pearson_region"],
        "remove_group_region": methods["simulator_remove"]["group"].get("pearson_smoothed"),
        "best_saliency": best,
        "best_saliency_region": methods[best]["group"].get("pearson_smoothed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="gradient,gradient_x_input,integrated_gradients,"
                        "smoothgrad", help="saliency baselines of the benchmark (occlusion "
                        "at stride 2 costs DenseNet121 about 3,400 forward passes per image)")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cohort, cnn, dense = out / "cohort", out / "cnn", out / "densenet"
    times: dict[str, float] = {}

    def timed(name: str, argv: list[str]) -> None:
        started = time.perf_counter()
        assert cli(argv) == 0, argv
        times[name] = round(time.perf_counter() - started, 1)

    if not (cohort / "manifest.csv").is_file():
        timed("synth", ["synth", "--out", str(cohort), "--n", str(args.n), "--seed",
                        str(args.seed)])
    if not (cnn / "classifier.pt").is_file():
        timed("cnn_train", ["train-classifier", "--manifest", str(cohort / "manifest.csv"),
                            "--out", str(cnn), "--epochs", str(args.epochs), "--seed",
                            str(args.seed)])
    split = json.loads((cnn / "split.json").read_text())
    dense.mkdir(exist_ok=True)
    if not (out / "densenet.ts").is_file():
        started = time.perf_counter()
        model, dense_metrics = _train_densenet(cohort, split, args.epochs, args.seed)
        times["densenet_train"] = round(time.perf_counter() - started, 1)
        torch.jit.save(torch.jit.script(model), out / "densenet.ts")
        (out / "densenet_metrics.json").write_text(json.dumps(dense_metrics, indent=2))
        (out / "classifier.json").write_text(json.dumps(
            {"input_shape": [32, 32, 32], "intensity": "zscore-brain", "output": "logit",
             "positive_label": "1"}))
    dense_metrics = json.loads((out / "densenet_metrics.json").read_text())
    shutil.copyfile(cnn / "split.json", dense / "split.json")
    manifest = str(cohort / "manifest.csv")
    timed("cnn_fit", ["fit", "--manifest", manifest, "--run", str(cnn), "--steps",
                      str(args.steps)])
    timed("densenet_fit", ["fit", "--manifest", manifest, "--run", str(dense), "--classifier",
                           str(out / "densenet.ts"), "--contract", str(out / "classifier.json"),
                           "--steps", str(args.steps)])
    rows = {}
    for name, run in (("paper CNN", cnn), ("MONAI DenseNet121", dense)):
        timed(f"{run.name}_benchmark", ["benchmark", "--data", str(cohort), "--run", str(run),
                                        "--out", str(run / "benchmark"), "--methods",
                                        args.methods])
        rows[name] = _benchmark_row(json.loads((run / "benchmark" / "results.json").read_text()))
    cnn_metrics = json.loads((cnn / "classifier_metrics.json").read_text())
    rows["paper CNN"]["test_balanced_accuracy"] = cnn_metrics["test"]["balanced_accuracy"]
    rows["MONAI DenseNet121"]["test_balanced_accuracy"] = dense_metrics["test"][
        "balanced_accuracy"]
    summary = {"rows": rows, "seconds": times, "n_test": len(split["test"]),
               "settings": vars(args) | {"out": str(out)}}
    (out / "byo_densenet.json").write_text(json.dumps(summary, indent=2, default=str))

    def fmt(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) and np.isfinite(value) else str(value)

    keys = ["test_balanced_accuracy", "moved_remove", "moved_inject", "folding",
            "inject_vs_truth_voxel", "inject_vs_truth_region", "remove_group_region",
            "best_saliency",
            "best_saliency_region"]
    lines = ["| classifier | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(row.get(k)) for k in keys) + " |"
              for name, row in rows.items()]
    (out / "byo_densenet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(times))


if __name__ == "__main__":
    main()
