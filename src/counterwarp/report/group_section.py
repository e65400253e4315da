"""The report's group section: who entered each group map, what the test tests, what
survives, and the region table with its intervals (read from ``counterwarp group``'s files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from counterwarp.report.markup import DIRECTION_WORDS, parse_number, read_csv, read_json, table
from counterwarp.report.markup import escape as _e
from counterwarp.report.markup import image_file as _image_file
from counterwarp.report.markup import note as _note

__all__ = ["group_section"]

_REGION_KEYS = ("name", "percent_volume_change", "percent_ci_low", "percent_ci_high",
                "n_voxels", "t", "p")


def _who(summary: dict[str, Any]) -> str:
    """Who entered the map, and who was left out, in words."""
    text = f"{_e(summary.get('n_subjects'))} {_e(summary.get('subjects', ''))} subjects"
    invalid = summary.get("n_invalid")
    if invalid and not summary.get("invalid_included"):
        text += (f" with a valid explanation ({_e(invalid)} of {_e(summary.get('n_explained'))}"
                 " left out: the logit did not move past the margin, or the warp folds)")
    elif invalid:
        text += (f", <strong>{_e(invalid)} of them with an invalid explanation</strong> "
                 "(included: too few were valid, or on request)")
    return text


def _significance(summary: dict[str, Any]) -> str:
    permutation = summary.get("permutation") or {}
    if permutation.get("warning") and not permutation.get("tested"):
        return f"<p><strong>No significance reported:</strong> {_e(permutation['warning'])}.</p>"
    parts = []
    if permutation.get("tested"):
        parts.append(
            f"{_e(permutation.get('n_fwe_voxels_tfce'))} of {_e(summary.get('n_brain_voxels'))}"
            f" brain voxels survive family-wise error p &lt; {_e(permutation.get('alpha'))} "
            f"by TFCE ({_e(permutation.get('n_fwe_voxels_tfce_positive'))} growing, "
            f"{_e(permutation.get('n_fwe_voxels_tfce_negative'))} shrinking), "
            f"{_e(permutation.get('n_fwe_voxels_t'))} by max-t "
            f"({_e(permutation.get('n_permutations'))} sign flips)")
    parts.append(f"{_e(summary.get('n_fdr_voxels'))} survive the voxel-wise t test at "
                 f"FDR q = {_e(summary.get('q'))}")
    tested = permutation.get("what_is_tested")
    return ("<p>" + "; ".join(parts) + ".</p>"
            + (f'<p class="muted">What is tested: {_e(tested)}</p>' if tested else ""))


def group_section(folder: Path, errors: dict[str, str], has_simulator: bool) -> str:
    """HTML of the group maps of both directions in ``folder``."""
    parts: list[str] = [
        "<p>Mean log volume change per direction, shown as percent volume change (red: the "
        "anatomy grows, blue: it shrinks), over the mean anatomy. Each direction maps its "
        "own subjects: inject on the healthy, remove on the diseased. Right: only voxels "
        "that survive the permutation test's family-wise error control.</p>"
    ]
    for direction in ("inject", "remove"):
        if direction in errors:
            parts.append(_note(f"group maps ({direction}) could not be computed: "
                               f"{errors[direction]}"))
            continue
        summary = read_json(folder / f"group_{direction}_summary.json")
        if summary is None:
            parts.append(_note(
                f"no group maps for {direction}: simulator not fitted yet" if not
                has_simulator else f"no group maps for {direction} in {folder}"))
            continue
        parts.append(f"<h3>{_e(DIRECTION_WORDS[direction])}</h3>")
        parts.append(f"<p>{_who(summary)}; space: {_e(summary.get('space'))}.</p>")
        parts.append(_significance(summary))
        figures = [(folder / f"group_{direction}_mean.png", "mean"),
                   (folder / f"group_{direction}_mean_significant.png", "significant voxels")]
        shown = [_image_file(path, f"group {direction} map", caption)
                 for path, caption in figures if path.is_file()]
        parts.append('<div class="row">' + "".join(shown) + "</div>" if shown
                     else _note("group figures missing"))
        regions = read_csv(folder / f"group_{direction}_regions.csv")
        if regions:
            keys = [k for k in _REGION_KEYS if k in regions[0]]
            rows = [[parse_number(row.get(k, "")) for k in keys] for row in regions]
            parts.append("<p>Percent volume change per region, sorted by |effect|, with its "
                         "95 % bootstrap interval over subjects ('outside' = brain voxels in "
                         "no region):</p>")
            parts.append(table(keys, rows))
    parts.append(f'<p class="muted">NIfTI maps (mean, effect size, t, FWE and FDR masks) in '
                 f"{_e(folder)}</p>")
    return "\n".join(parts)
