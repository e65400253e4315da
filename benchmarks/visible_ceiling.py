"""How well can a map that changes only what the image shows agree with a cohort's truth?

A ``synth`` cohort's truth scales whole ellipsoids (``truth/effect_regions.nii.gz``), the
visible structure *and* the uniform tissue around it. An image only shows where edges
moved: inside uniform tissue, volume change leaves no trace. This script scores idealised
"visible" explanations against the template-space effect map, with the benchmark's
Pearson over the template brain mask:

- ``darkest q``: indicator of the darkest ``q`` share of voxels inside the chosen regions
  (the CSF of the ventricles in a T1 image) in the mean held-out image: "the ventricles
  grow, nothing else changes", raw and Gaussian-smoothed;
- ``whole regions``: indicator of the whole ellipsoids, uniform growth where the truth put
  it (not visible in the image).

If even the smoothed ``darkest`` indicators stay below a saliency baseline's score, the
benchmark's voxel correlation cannot be won by a faithful explanation of visible anatomy.

Usage::

    python benchmarks/visible_ceiling.py --data runs/demo/cohort --run runs/demo/run \\
        --regions 1,2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from counterwarp.errors import CounterwarpError
from counterwarp.stats.scores import pearson, smooth

QUANTILES = (0.1, 0.25, 0.5)
SIGMAS = (0.0, 1.0, 1.5)


def visible_ceiling(
    effect: np.ndarray, brain: np.ndarray, regions: np.ndarray, image: np.ndarray,
    labels: Sequence[int], quantiles: Sequence[float] = QUANTILES,
    sigmas: Sequence[float] = SIGMAS,
) -> dict[str, Any]:
    """Pearson of idealised visible-change maps with the truth.

    Args:
        effect: ``(*S)`` true log volume change (template space).
        brain: ``(*S)`` bool brain mask, where correlations are taken.
        regions: ``(*S)`` int region labels (0 outside).
        image: ``(*S)`` mean image (intensities; darker = CSF in T1).
        labels: region labels whose darkest voxels make the visible structure.
        quantiles: shares of the darkest voxels inside the regions.
        sigmas: Gaussian sd (voxels) applied to each indicator (0 = raw).

    Returns:
        ``{"darkest": [{"quantile", "voxels", "pearson": {sigma: r}}], "whole_regions": r,
        "region_voxels": n}``.
    """
    inside = np.isin(regions, list(labels)) & brain
    if not inside.any():
        raise CounterwarpError(f"no brain voxel carries the region labels {list(labels)}")
    rows = []
    for q in quantiles:
        dark = inside & (image <= np.quantile(image[inside], q))
        indicator = dark.astype(np.float64)
        rows.append({
            "quantile": q, "voxels": int(dark.sum()),
            "pearson": {str(s): pearson(smooth(indicator, s) if s > 0 else indicator,
                                        effect, brain) for s in sigmas},
        })
    return {
        "darkest": rows,
        "whole_regions": pearson(inside.astype(np.float64), effect, brain),
        "region_voxels": int(inside.sum()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from counterwarp.data.truth import load_cohort_truth
    from counterwarp.workflows.folder import (
        load_images,
        load_run_simulator,
        model_shape,
        rows_in_split,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="cohort from counterwarp synth")
    p.add_argument("--run", type=Path, required=True, help="run folder (its test split)")
    p.add_argument("--regions", default="1,2", help="region labels (default 1,2: ventricles)")
    args = p.parse_args(argv)
    try:
        labels = [int(x) for x in args.regions.split(",") if x.strip()]
        _, payload = load_run_simulator(args.run)
        rows = rows_in_split(args.run, args.data / "manifest.csv", "test",
                             positive_label=payload.get("positive_label"))
        shape = model_shape(payload)
        truth = load_cohort_truth(args.data, rows, shape)  # checks the cohort's truth/ files
        regions_path = args.data / "truth" / "effect_regions.nii.gz"
        if not regions_path.is_file():
            raise CounterwarpError(f"{regions_path}: missing; --data must be a synth cohort")
        regions = np.asarray(nib.load(regions_path).dataobj).astype(int)
        if regions.shape != shape:
            raise CounterwarpError(f"{regions_path}: shape {regions.shape}, the run's {shape}")
        images, _ = load_images(rows, shape, progress=False)
        result = visible_ceiling(truth.effect, truth.template_mask, regions,
                                 images[:, 0].numpy().mean(0), labels)
    except (CounterwarpError, ValueError) as error:
        print(f"visible_ceiling: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
