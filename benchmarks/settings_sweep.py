"""Fit one simulator with given settings for an existing classifier and score it (the
measurements behind the README's "Simulator defaults" table).

The run's classifier files are copied into ``OUT/<name>`` (the source run is not touched),
a simulator is fitted there with ``fit_run(..., **settings)`` on the train+val images, and
its held-out (test) images are scored with :func:`counterwarp.explain.assess.assess_simulator`
against the cohort's truth, plus the same agreement for the negated "remove" maps of the
diseased subjects and the mean map inside each true effect region. One JSON line is
appended to ``OUT/sweep.jsonl`` and printed.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/settings_sweep.py --data runs/demo/cohort \\
        --run runs/demo/run --out runs/sweep --name wm001 \\
        --settings '{"w_magnitude": 0.01, "seed": 1}'
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from counterwarp._io import atomic_path
from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import assess_simulator, explain_in_batches
from counterwarp.stats.scores import pearson, smooth
from counterwarp.workflows.fit import fit_run
from counterwarp.workflows.folder import load_images, load_run_simulator, model_shape, rows_in_split

CLASSIFIER_FILES = ("classifier.pt", "split.json", "classifier_metrics.json")


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def sweep_one(data: Path, run: Path, out: Path, name: str, settings: dict[str, Any],
              sigma: float = 1.5) -> dict[str, Any]:
    """Fit and score one setting; returns the JSON-able record (see the module docstring)."""
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in CLASSIFIER_FILES:
        if not (run / file).is_file():
            raise CounterwarpError(f"{run / file}: missing; --run must hold a trained classifier")
        shutil.copy(run / file, target / file)
    started = time.perf_counter()
    fit_run(data / "manifest.csv", target, progress=False, **settings)
    fit_seconds = time.perf_counter() - started
    simulator, payload = load_run_simulator(target)
    rows = rows_in_split(target, data / "manifest.csv", "test",
                         positive_label=payload.get("positive_label"))
    images, labels = load_images(rows, model_shape(payload), progress=False)
    truth = _read(data / "truth" / "effect_log_volume_change.nii.gz")
    mask = _read(data / "truth" / "brain_mask.nii.gz") > 0
    regions = _read(data / "truth" / "effect_regions.nii.gz").astype(int)
    scores = assess_simulator(simulator, images, labels, truth, mask, sigma=sigma)
    record: dict[str, Any] = {
        "name": name, "settings": settings, "fit_s": round(fit_seconds, 1),
        "remove_moved": scores["remove_moved_share"], "inject_moved": scores["inject_moved_share"],
        "flips": [scores["remove_flips"], scores["inject_flips"]],
        "folding_max": scores["folding_share_max"],
        "cycle_relative": scores["cycle_error_relative"],
        "inject_voxel": scores["inject_truth_pearson_voxel"],
        "inject_region": scores["inject_truth_pearson_region"],
    }
    diseased = labels == 1
    if bool(diseased.any()):
        removed = -explain_in_batches(simulator, images[diseased], "remove").log_volume_change
        mean_map = removed.mean(0).numpy()
        record["minus_remove_voxel"] = pearson(mean_map, truth, mask)
        record["minus_remove_region"] = pearson(smooth(mean_map, sigma), smooth(truth, sigma),
                                                mask)
        record["minus_remove_region_means"] = [
            float(mean_map[regions == k].mean()) for k in range(1, int(regions.max()) + 1)
        ] + [float(mean_map[mask & (regions == 0)].mean())]
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="cohort from counterwarp synth")
    p.add_argument("--run", type=Path, required=True, help="run folder with the classifier")
    p.add_argument("--out", type=Path, required=True, help="folder for the sweep's runs")
    p.add_argument("--name", required=True, help="name of this setting (a sub-folder)")
    p.add_argument("--settings", default="{}", help="JSON object of FitConfig settings")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        settings = json.loads(args.settings)
        if not isinstance(settings, dict):
            raise CounterwarpError("--settings must be a JSON object, e.g. '{\"seed\": 1}'")
        record = sweep_one(args.data, args.run, args.out, args.name, settings)
    except (CounterwarpError, json.JSONDecodeError) as error:
        print(f"settings_sweep: {error}", file=sys.stderr)
        return 2
    line = json.dumps(record)
    print(line)
    log = args.out / "sweep.jsonl"
    previous = log.read_text() if log.exists() else ""
    with atomic_path(log) as temporary:
        Path(temporary).write_text(previous + line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
