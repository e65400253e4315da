"""The file names of ``counterwarp explain``'s outputs: a BIDS-derivatives-like layout.

One home for every name, so the writer (``workflows/explain.py``, ``workflows/progression.py``)
and every reader (``data/maps.py``, ``report/``, tests) agree. Per image and direction::

    <id>_desc-<direction>_simulated.nii.gz    the input image warped (its own intensities)
    <id>_desc-<direction>_logjac.nii.gz       log volume change of the anatomy (growth > 0)
    <id>_desc-<direction>_xfm.nii.gz          ITK / ANTs displacement field (LPS mm)
    <id>_desc-<direction>_panel.png           the figure
    <id>_desc-<direction>_progression.gif     ``--progression N`` only

``<id>`` is the image's file-name-safe id (:func:`counterwarp.data.manifest.image_id`)
with a trailing BIDS suffix dropped when the rest is made of BIDS entities
(``sub-01_ses-1_T1w`` -> ``sub-01_ses-1``; ``sub-0002`` and ``scan1`` stay as they are),
see :func:`derivative_id`. The direction rides in BIDS's free ``desc`` entity. Each output
folder also holds ``dataset_description.json`` (:func:`dataset_description`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: Output kind -> the suffix and extension after ``<id>_desc-<direction>``.
KINDS: dict[str, str] = {
    "simulated": "_simulated.nii.gz",
    "logjac": "_logjac.nii.gz",
    "xfm": "_xfm.nii.gz",
    "panel": "_panel.png",
    "progression": "_progression.gif",
}
#: The BIDS version the ``dataset_description.json`` of an output folder declares.
BIDS_VERSION = "1.9.0"
#: Name of the BIDS dataset description written into every ``explain`` output folder.
DATASET_DESCRIPTION_NAME = "dataset_description.json"

_ENTITY = re.compile(r"[A-Za-z0-9]+-[A-Za-z0-9]+")
_SUFFIX = re.compile(r"[A-Za-z0-9]+")


#: Entities of an input's name that its outputs set themselves (and so drop).
OWN_ENTITIES = ("space", "desc")


def derivative_id(image_id: str) -> str:
    """The ``<id>`` of an image's output names: ``image_id`` minus a trailing BIDS suffix
    and the ``space-`` / ``desc-`` entities the outputs set themselves.

    Only when the last ``_``-separated part is a plain alphanumeric suffix (``T1w``) and
    every part before it is a BIDS ``key-value`` entity: ``sub-01_ses-1_T1w`` ->
    ``sub-01_ses-1``; a prepared ``sub-01_space-MNI152_desc-preproc_T1w`` -> ``sub-01``;
    ``sub-0002``, ``scan1`` and ``other_subject`` stay unchanged.
    """
    parts = image_id.split("_")
    if (len(parts) > 1 and _SUFFIX.fullmatch(parts[-1])
            and all(_ENTITY.fullmatch(part) for part in parts[:-1])):
        kept = [p for p in parts[:-1] if p.split("-", 1)[0] not in OWN_ENTITIES]
        return "_".join(kept) if kept else image_id
    return image_id


def output_name(id_: str, direction: str, kind: str) -> str:
    """The file name of one output: ``<id_>_desc-<direction><KINDS[kind]>``.

    Args:
        id_: the output id (:func:`derivative_id`, made unique by :func:`unique_output_ids`).
        direction: ``"inject"`` or ``"remove"``.
        kind: a key of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {sorted(KINDS)}")
    return f"{id_}_desc-{direction}{KINDS[kind]}"


def output_stem_suffix(direction: str, kind: str) -> str:
    """What the NIfTI stem of every ``kind`` output of ``direction`` ends with
    (``_desc-inject_logjac``), for readers that pick outputs out of a folder."""
    return output_name("", direction, kind).split(".", 1)[0]


def unique_output_ids(paths: list[Path]) -> list[str]:
    """One :func:`derivative_id` per image path, made unique by ``_2``, ``_3`` ... suffixes.

    Unique even when a suffixed id is itself another image's id (``a``, ``a``, ``a_2``),
    when two images share their entities (``sub-01_T1w``, ``sub-01_T2w``) and when ids
    differ only in case (outputs may go to a case-insensitive disk).
    """
    from counterwarp.data.manifest import image_id

    ids: list[str] = []
    used: set[str] = set()
    for path in paths:
        base = candidate = derivative_id(image_id(path))
        count = 1
        while candidate.casefold() in used:
            count += 1
            candidate = f"{base}_{count}"
        used.add(candidate.casefold())
        ids.append(candidate)
    return ids


def dataset_description(version: str) -> dict[str, Any]:
    """The BIDS derivative ``dataset_description.json`` of an output folder, as a dict."""
    return {
        "Name": "counterwarp explanations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "counterwarp",
            "Version": version,
            "Description": "simulated images (the input warped, its own intensities), "
                           "log volume change maps (desc-<direction>_logjac, growth > 0) and "
                           "ITK / ANTs displacement fields (xfm, LPS mm, pull-back)",
        }],
    }
