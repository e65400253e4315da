"""The tables and the figure of ``counterwarp sanity`` (:mod:`counterwarp.workflows.sanity`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from counterwarp.report.display import save_figure
from counterwarp.stats.benchmark_scores import format_number

__all__ = [
    "RANDOMISED_AGREEMENT_LIMIT",
    "STILL_SEPARATES_AUROC",
    "first_stage_without_group_signal",
    "randomisation_figure",
    "sanity_markdown",
    "still_separating_stages",
]

#: Agreement with the original above which a method fails the randomisation check once
#: the classifier's last block is randomised.
RANDOMISED_AGREEMENT_LIMIT = 0.3

#: A randomised classifier whose held-out AUROC is at least this far from chance (0.5),
#: either way round, still tells the groups apart.
STILL_SEPARATES_AUROC = 0.3


def _separates(row: dict[str, Any]) -> bool | None:
    """Whether a ``randomised_classifiers`` row still tells the groups apart (None: its
    AUROC is unknown)."""
    auroc = row.get("auroc")
    if auroc is None or not np.isfinite(auroc):
        return None
    return abs(auroc - 0.5) >= STILL_SEPARATES_AUROC


def still_separating_stages(result: dict[str, Any]) -> list[int]:
    """The cascading stages whose randomised classifier still tells the groups apart."""
    return [int(row["stage"]) for row in result.get("randomised_classifiers") or []
            if _separates(row)]


def first_stage_without_group_signal(classifiers: list[dict[str, Any]]) -> int | None:
    """The first stage whose randomised classifier no longer tells the groups apart (AUROC
    within ``STILL_SEPARATES_AUROC`` of chance), or None."""
    return next((int(row["stage"]) for row in classifiers if _separates(row) is False), None)


def _failing(rows: list[dict[str, Any]]) -> list[str]:
    """The methods of ``rows`` whose agreement (either measure) exceeds the limit."""
    return [r["method"] for r in rows
            if np.nanmax([r["agreement_spearman"] or np.nan,
                          r["agreement_group_pearson"] or np.nan])
            > RANDOMISED_AGREEMENT_LIMIT]


def _by_method(rows: list[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        value = row.get(key)
        if value is not None:
            series.setdefault(row["method"], []).append((int(row["stage"]), float(value)))
    return series


def randomisation_figure(result: dict[str, Any], path: Path) -> Path:
    """Agreement with the trained classifier's maps per cascading stage, one line per
    method: per-image Spearman of ``|map|`` (signed maps for the simulator), and the
    Pearson of the group maps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10.0, 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    stages = result["stages"]
    for ax, key, title in ((axes[0], "agreement_spearman", "per image (Spearman)"),
                           (axes[1], "agreement_group_pearson", "group map (Pearson)")):
        for method, points in _by_method(result["randomisation"], key).items():
            x, y = zip(*points, strict=True)
            style = {"linewidth": 2.5, "color": "black", "marker": "o"} if method.startswith(
                "simulator") else {"linewidth": 1.2, "marker": "."}
            ax.plot(x, y, label=method, **style)
        control = (result.get("seed_control") or {}).get(key)
        if control is not None:
            ax.axhline(control, color="black", linestyle=":", label="simulator, other seed")
        ax.axhline(RANDOMISED_AGREEMENT_LIMIT, color="red", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(1, len(stages) + 1))
        ax.set_xticklabels([s.split(" + ")[-1] for s in stages], rotation=30, fontsize=7)
        ax.set_xlabel("randomised down to block")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.2, 1.02)
    axes[0].set_ylabel("agreement with the trained classifier's maps")
    axes[1].legend(fontsize=6, loc="upper right")
    figure.suptitle("cascading randomisation of the classifier (red: 0.3)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)


def sanity_markdown(result: dict[str, Any]) -> str:
    """``sanity.md``: what each check tests, its table, and whether it passes."""
    f = format_number
    lines = [
        "# Sanity checks", "",
        f"Run `{result.get('run')}`, {result.get('n_images')} held-out images "
        f"(`{result.get('split')}`).", "",
        "## Cascading randomisation of the classifier", "",
        "The classifier's blocks are re-initialised from the output backwards; each "
        "method's maps are compared with its maps of the trained classifier (saliency: "
        "|map|; simulator: refitted against the randomised classifier, signed 'inject' "
        "maps). A method that explains the classifier must lose agreement at once; "
        f"agreement above {RANDOMISED_AGREEMENT_LIMIT} after the last block is randomised "
        "fails.", "",
        "| stage | randomised blocks | method | per-image Spearman | group Pearson | "
        "moved past margin |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["randomisation"]:
        lines.append(
            f"| {row['stage']} | {row['blocks']} | {row['method']} | "
            f"{f(row['agreement_spearman'])} | {f(row['agreement_group_pearson'])} | "
            f"{f(row['moved_share'])} |")
    failing = _failing([r for r in result["randomisation"] if r["stage"] == 1])
    lines += ["", ("Fails after the last block is randomised: " + ", ".join(failing))
              if failing else "Every method passes after the last block is randomised.", ""]
    left = result.get("randomised_classifiers") or []
    if left:
        lines += [
            "### What each randomised classifier still does", "",
            "A random read-out of trained features can still tell the groups apart. Where "
            "it does, a faithful explanation of the randomised classifier should look "
            "like the original one, and that stage cannot fail a method; the stages where "
            "the group signal is gone (AUROC near 0.5) are the informative ones.", "",
            "| stage | randomised blocks | held-out AUROC | logit Pearson with the trained |",
            "|---|---|---|---|"]
        lines += [f"| {row['stage']} | {row['blocks']} | {f(row['auroc'])} | "
                  f"{f(row['logit_pearson'])} |" for row in left]
        separating = still_separating_stages(result)
        if 1 in separating:
            lines += ["", "After the last block is randomised the classifier still tells "
                      f"the groups apart (AUROC {f(left[0]['auroc'])}): the check above "
                      "is confounded there."]
        k = first_stage_without_group_signal(left)
        if k is not None:
            failing_k = _failing([r for r in result["randomisation"] if r["stage"] == k])
            verdict = (("fails: " + ", ".join(failing_k)) if failing_k
                       else "every method scored there passes")
            lines += ["", f"Stage {k} is the first whose classifier no longer tells the "
                      f"groups apart (AUROC {f(left[k - 1]['auroc'])}); there, agreement "
                      f"above {RANDOMISED_AGREEMENT_LIMIT} {verdict}."]
        lines.append("")
    control = result.get("seed_control")
    if control:
        lines += [
            "## Seed control", "",
            "The simulator refitted for the trained classifier with another seed "
            f"(seed {control['seed']}): per-image Spearman "
            f"{f(control['agreement_spearman'])}, group Pearson "
            f"{f(control['agreement_group_pearson'])}, moved past the margin "
            f"{f(control['moved_share'])}. This is the seed-to-seed agreement; a "
            "randomised classifier's must be far below it.", ""]
    oracle = result.get("oracle")
    if oracle:
        lines += [
            "## Oracle classifier", "",
            f"An independent CNN (channels {oracle['oracle_channels']}, another seed), "
            f"trained on the run's training images (held-out AUROC "
            f"{f(oracle['oracle_test_auroc'])}). The simulated images must move it the way "
            "they move the explained classifier; if only the explained one moves, the warp "
            "exploits that network rather than showing the disease.", "",
            "| direction | n | oracle moved the asked way | oracle mean shift (sd) | "
            "classifier moved | classifier mean shift (sd) |", "|---|---|---|---|---|---|"]
        for direction in ("inject", "remove"):
            part = oracle.get(direction)
            if part:
                lines.append(
                    f"| {direction} | {part['n']} | {f(part['oracle_moved_share'])} | "
                    f"{f(part['oracle_mean_shift_sd'])} | {f(part['classifier_moved_share'])} "
                    f"| {f(part['classifier_mean_shift_sd'])} |")
        lines.append("")
    other = result.get("compare_run_agreement")
    if other:
        lines += ["## Another run", "",
                  f"The simulator of `{result.get('compare_run')}` on the same images: "
                  f"per-image Spearman {f(other['agreement_spearman'])}, group Pearson "
                  f"{f(other['agreement_group_pearson'])} with this run's maps.", ""]
    return "\n".join(lines)
