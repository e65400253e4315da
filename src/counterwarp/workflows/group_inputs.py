"""The per-subject maps a group analysis starts from, made by the run's simulator.

The simulator explains the held-out (``split``) images of the run's manifest in one
direction. By default only the subjects whose explanation answers that direction's
question enter the group (``inject`` on healthy subjects, ``remove`` on diseased ones,
:data:`~counterwarp.explain.validity.GROUP_SUBJECTS`), and of those only the valid
explanations (moved past the margin, no folding; :mod:`counterwarp.explain.validity`);
the counts of what was left out travel with the maps.

The maps are on the model grid. This is a common space only because the images are
affinely aligned to one template before counterwarp sees them (the synthetic cohort is
built in MNI152 template space, so there voxels correspond across subjects); counterwarp
does not register images, and refuses images whose model grids differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from counterwarp.data.maps import AFFINE_TOLERANCE_MM
from counterwarp.data.truth import COHORT_NAME
from counterwarp.errors import CounterwarpError
from counterwarp.explain.validity import GROUP_SUBJECTS

__all__ = ["SUBSETS", "maps_from_simulator", "resolve_subset"]

#: Which subjects enter a group map: ``auto`` = the direction's own group
#: (:data:`GROUP_SUBJECTS`), or all / healthy / diseased ones by manifest label.
SUBSETS = ("auto", "all", "healthy", "diseased")


def resolve_subset(subset: str, direction: str) -> str:
    """``subset`` with ``auto`` replaced by the direction's own group of subjects."""
    if subset not in SUBSETS:
        raise CounterwarpError(f"--subjects {subset!r}: use one of {', '.join(SUBSETS)}")
    return GROUP_SUBJECTS[direction] if subset == "auto" else subset


def cohort_space_note(manifest: Path) -> str:
    """In words: the space the simulator's maps of ``manifest``'s images share."""
    if (manifest.parent / COHORT_NAME).is_file():
        return (
            "MNI152 template space: the synthetic cohort is built on the MNI152 template grid, "
            "so voxels correspond across subjects (maps on the classifier's model grid)"
        )
    return (
        "the common model grid of the input images; this is one space only if the images "
        "were affinely registered to one template beforehand (counterwarp does not "
        "register images)"
    )


def maps_from_simulator(
    run: Path, direction: str, manifest: str | Path | None, split: str, subset: str,
    progress: bool, valid_only: bool = True,
) -> dict[str, Any]:
    """Per-subject log volume change maps of ``direction`` from the run's simulator.

    Args:
        subset: ``healthy``, ``diseased`` or ``all`` (resolved by :func:`resolve_subset`).
        valid_only: leave out invalid explanations (counted in ``n_invalid``).

    Returns:
        ``maps`` float64 ``(N, *S)``, ``affine`` ``(4, 4)``, ``ids`` (N), ``anatomy``
        ``(*S)`` mean z-scored image, ``brain`` ``(*S)`` bool, ``source`` and ``space``
        (text), ``n_explained`` (subjects explained), ``n_invalid`` and ``invalid_ids`` (invalid
        explanations), ``invalid_included`` (``not valid_only``) and ``subset``.
    """
    import torch

    from counterwarp.data.manifest import image_id
    from counterwarp.data.preprocess import load_model_input
    from counterwarp.workflows.folder import (
        SPLIT_NAME,
        load_run_simulator,
        model_preprocessing,
        model_shape,
        read_split,
        rows_in_split,
    )

    split_info = read_split(run)
    if manifest is None:
        recorded = split_info.get("manifest")
        if not recorded:
            raise CounterwarpError(
                f"{run / SPLIT_NAME} names no manifest; pass --manifest M (or --maps DIR)"
            )
        manifest = Path(recorded)
    manifest = Path(manifest)
    simulator, payload = load_run_simulator(run)
    rows = rows_in_split(run, manifest, split, positive_label=payload.get("positive_label"))
    if subset != "all":
        wanted = 0 if subset == "healthy" else 1
        rows = [row for row in rows if int(row.label) == wanted]
    if len(rows) < 2:
        raise CounterwarpError(
            f"group analysis needs at least 2 images; the {split!r} part of the split has "
            f"{len(rows)} ({subset} subjects)"
        )
    shape = model_shape(payload)
    tensors, affines, ids = [], [], []
    for row in tqdm(rows, desc="group: load", disable=not progress):
        tensor, volume = load_model_input(row.path, shape, model_preprocessing(payload))
        tensors.append(tensor)
        affines.append(volume.model_affine)
        ids.append(image_id(row.path))
    for path_row, affine in zip(rows, affines, strict=True):
        if not np.allclose(affine, affines[0], atol=AFFINE_TOLERANCE_MM):
            raise CounterwarpError(
                f"{path_row.path} lies on another grid (affine) than {rows[0].path}: the images "
                f"are not in one space. Register them to a template, run `counterwarp "
                f"explain`, and pass the registered maps with --maps DIR"
            )
    images = torch.stack(tensors)  # (N, 1, *S)
    changes, valid = [], []
    for start in tqdm(range(0, len(rows), 8), desc=f"group: {direction}",
                      disable=not progress):
        explanation = simulator.explain(images[start : start + 8], direction)
        changes.append(explanation.log_volume_change.numpy())
        valid.append(explanation.valid.numpy())
    is_valid = np.concatenate(valid)
    keep = is_valid if valid_only else np.ones(len(rows), bool)
    if keep.sum() < 2:
        raise CounterwarpError(
            f"only {int(keep.sum())} of {len(rows)} {subset} subjects have a valid "
            f"{direction} explanation (moved past the margin, no folding): too few for a "
            f"group map. Fit the simulator longer, or pass --all-explanations to map them "
            f"anyway"
        )
    image_values = images[:, 0].numpy().astype(np.float64)
    return {
        "maps": np.concatenate(changes)[keep].astype(np.float64),
        "affine": np.asarray(affines[0], dtype=np.float64),
        "ids": [i for i, k in zip(ids, keep, strict=True) if k],
        "anatomy": image_values.mean(axis=0),
        "brain": (image_values != 0).mean(axis=0) >= 0.5,
        "source": f"simulator of {run} on the {split!r} part of {manifest} ({subset} subjects"
                  + (", valid explanations only)" if valid_only else ", all explanations)"),
        "space": cohort_space_note(manifest),
        "n_explained": len(rows),
        "n_invalid": int((~is_valid).sum()),
        "invalid_ids": [i for i, k in zip(ids, is_valid, strict=True) if not k],
        "invalid_included": not valid_only,
        "subset": subset,
    }
