"""``counterwarp report --run RUN``: one self-contained HTML page about a run.

The page embeds every image as a base64 ``data:`` URI and its style inline; it has no
scripts, fonts or links to load, so it opens from disk with no server and no network.
Every section is optional: what the run folder lacks is replaced by a short note
("simulator not fitted yet") instead of an error. All text taken from files is escaped.

Sections: cohort and classifier (``split.json``, ``classifier_metrics.json``,
``classifier_log.csv``); simulator fit (``simulator_fit.json``, ``simulator_log.csv``, the
demo's held-out assessment when present); group maps (``RUN/group``); per-subject panels of a
few held-out subjects for both directions with saliency baselines beside them (from an
``explain`` / ``saliency`` folder); the benchmark table (``results.md``) when present.

This module only renders files that exist: :class:`ReportInputs` says where they are.
Finding them, and making the missing ones, is the job of :mod:`counterwarp.workflows.report`.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from counterwarp._io import write_text_atomic
from counterwarp.data.truth import COHORT_NAME
from counterwarp.errors import CounterwarpError
from counterwarp.report.group_section import group_section
from counterwarp.report.markup import DIRECTION_WORDS, markdown_to_html, read_json
from counterwarp.report.markup import escape as _e
from counterwarp.report.markup import figure_uri as _figure_uri
from counterwarp.report.markup import format_cell as _fmt
from counterwarp.report.markup import image as _image
from counterwarp.report.markup import image_file as _image_file
from counterwarp.report.markup import note as _note
from counterwarp.report.markup import parse_number as _number
from counterwarp.report.markup import read_csv as _read_csv
from counterwarp.report.markup import table as _table

__all__ = ["ReportInputs", "guarded_note", "render_report"]


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0;
       color: #1d232a; background: #f6f7f9; line-height: 1.45; }
header { background: #1d2733; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 24px; }
header p { margin: 0; color: #c9d2dc; font-size: 13px; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 40px 24px; }
section { background: #fff; border: 1px solid #dde2e8; border-radius: 6px;
          padding: 12px 20px 16px 20px; margin: 18px 0; }
h2 { font-size: 19px; margin: 6px 0 10px 0; border-bottom: 1px solid #e4e8ed;
     padding-bottom: 4px; }
h3 { font-size: 15px; margin: 14px 0 6px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px 0; }
th, td { border: 1px solid #d5dbe2; padding: 3px 8px; text-align: left; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #e1e5ea; }
figcaption { font-size: 12px; color: #56606b; }
.note { background: #fff8e5; border-left: 4px solid #e0b000; padding: 6px 10px;
        font-size: 13px; margin: 6px 0; }
.muted { color: #66707b; font-size: 12px; }
.subject { border-top: 1px solid #e4e8ed; margin-top: 12px; padding-top: 4px; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.row figure { flex: 1 1 360px; }
.subject .row figure { flex: 1 1 100%; }
code { background: #eef1f5; padding: 0 3px; border-radius: 3px; }
"""


# --------------------------------------------------------------------------- sections


@dataclass
class ReportInputs:
    """Where the files the page shows are (each None / empty when there are none).

    Attributes:
        run: the run folder.
        group_dir: folder of the group maps (``group_<direction>_*``).
        split: its ``split.json`` (None when the classifier is not trained yet).
        has_classifier, has_simulator: whether the run holds the two models.
        files: the run's tables by role (``classifier_metrics``, ``classifier_log``,
            ``simulator_fit``, ``simulator_log``, ``demo_summary``, ``explain_summary``);
            a missing role or file leaves its part of the page out.
        group_errors: direction -> why its group maps could not be made.
        subjects: the held-out ``split.json`` items to show.
        explain_dir, saliency_dir: folders with their panels
            (``<id>_desc-<direction>_panel.png``, ``summary.csv``; ``<id>_saliency.png``).
        explain_made, saliency_made: True when those were made for this page.
        saliency_error: why the saliency maps could not be made.
        saliency_methods: the methods used when they were made for this page.
        benchmark: the benchmark's ``results.md``.
        failed: section anchor -> note that replaces the section (making it failed).
    """

    run: Path
    group_dir: Path
    split: dict[str, Any] | None = None
    has_classifier: bool = False
    has_simulator: bool = False
    files: dict[str, Path] = field(default_factory=dict)
    group_errors: dict[str, str] = field(default_factory=dict)
    subjects: list[dict[str, Any]] = field(default_factory=list)
    explain_dir: Path | None = None
    explain_made: bool = False
    saliency_dir: Path | None = None
    saliency_made: bool = False
    saliency_error: str | None = None
    saliency_methods: tuple[str, ...] = ()
    benchmark: Path | None = None
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def manifest(self) -> Path | None:
        value = (self.split or {}).get("manifest")
        return Path(value) if value else None

    @property
    def cohort(self) -> Path | None:
        return self.manifest.parent if self.manifest is not None else None


def _cohort_section(ctx: ReportInputs) -> str:
    parts: list[str] = []
    if ctx.split is None:
        return _note("no split.json: the classifier has not been trained in this run yet")
    rows = []
    for part in ("train", "val", "test"):
        items = ctx.split.get(part) or []
        diseased = sum(1 for item in items if int(item.get("label", 0)) == 1)
        subjects = len({item.get("subject") for item in items})
        rows.append([part, len(items), subjects, diseased, len(items) - diseased])
    parts.append(f"<p>manifest: <code>{_e(ctx.split.get('manifest', '?'))}</code></p>")
    parts.append(_table(["part", "images", "subjects", "diseased (1)", "healthy (0)"], rows))
    cohort = read_json(ctx.cohort / COHORT_NAME) if ctx.cohort is not None else None
    if cohort is not None and cohort.get("generator", "").startswith("counterwarp"):
        parts.append(
            f"<p>Synthetic cohort built from the MNI152 template (images in template space): "
            f"{_e(cohort.get('n'))} subjects, {_e(cohort.get('n_diseased'))} diseased, "
            f"{_e(cohort.get('dim'))}D grid {_e(cohort.get('shape'))} at "
            f"{_e(_fmt(cohort.get('spacing_mm')))} mm, effect strength "
            f"{_e(cohort.get('effect'))}, seed {_e(cohort.get('seed'))}.</p>"
        )
    metrics = read_json(ctx.files.get("classifier_metrics"))
    if metrics is None:
        parts.append(_note("classifier not trained yet (no classifier_metrics.json)"))
    else:
        keys = ["n", "accuracy", "balanced_accuracy", "auc", "logit_mean", "logit_std"]
        table = [
            [part, *[(metrics[part] or {}).get(k) for k in keys]]
            for part in ("test", "val", "train") if isinstance(metrics.get(part), dict)
        ]
        parts.append("<h3>Classifier performance</h3>")
        parts.append(_table(["part", *keys], table))
        parts.append(
            f'<p class="muted">best epoch {_e(metrics.get("best_epoch"))} of '
            f'{_e(metrics.get("epochs"))}; input grid {_e(metrics.get("input_shape"))}; '
            f'device {_e(metrics.get("device"))}</p>'
        )
    log = _read_csv(ctx.files.get("classifier_log"))
    if log:
        from counterwarp.report.figures import classifier_curves_figure

        parts.append(_image(_figure_uri(classifier_curves_figure(log)),
                            "classifier training curves",
                            "classifier training: loss per epoch, validation AUC and "
                            "balanced accuracy"))
    return "\n".join(parts)


def _simulator_section(ctx: ReportInputs) -> str:
    fit = read_json(ctx.files.get("simulator_fit"))
    if fit is None and not ctx.has_simulator:
        return _note("simulator not fitted yet: run `counterwarp fit --manifest M --run RUN`")
    parts: list[str] = []
    if fit is not None:
        settings = fit.get("settings") or {}
        final = fit.get("final_step") or {}
        rows = [
            ["images used", fit.get("n_images")],
            ["split", fit.get("split")],
            ["margin (logits)", fit.get("margin")],
            ["margin rule", fit.get("margin_rule")],
            ["training logits mean / sd",
             f"{_fmt(fit.get('logit_mean'))} / {_fmt(fit.get('logit_std'))}"],
            ["field", settings.get("field")],
            ["steps, batch size, lr",
             f"{settings.get('steps')}, {settings.get('batch_size')}, {settings.get('lr')}"],
            ["regulariser", f"{settings.get('smooth_kind')} smoothness x "
                            f"{settings.get('w_smooth')}, magnitude x "
                            f"{settings.get('w_magnitude')}, cycle x {settings.get('w_cycle')}"],
            ["last step: moved past margin (share of batch)", final.get("moved_share")],
        ]
        parts.append(_table(["setting", "value"], rows))
    log = _read_csv(ctx.files.get("simulator_log"))
    if log:
        from counterwarp.report.figures import simulator_curves_figure

        parts.append(_image(_figure_uri(simulator_curves_figure(log)),
                            "simulator training curves",
                            "simulator training: loss terms per step (log scale) and the "
                            "share of each batch moved past the margin"))
    else:
        parts.append(_note("no simulator_log.csv in the run"))
    demo = read_json(ctx.files.get("demo_summary"))
    held = (demo or {}).get("held_out")
    if isinstance(held, dict):
        parts.append("<h3>Held-out assessment (demo)</h3>")
        parts.append(_table(["measure", "value"], [[k, v] for k, v in held.items()]))
    return "\n".join(parts)


def _group_section(ctx: ReportInputs) -> str:
    return group_section(ctx.group_dir, ctx.group_errors, ctx.has_simulator)


def _subjects_section(ctx: ReportInputs) -> str:
    from counterwarp.data.derivatives import derivative_id, output_name
    from counterwarp.data.manifest import image_id

    chosen = ctx.subjects
    if not chosen:
        return _note("no held-out subjects: the run has no split.json test part yet")
    ids = [image_id(Path(item["path"])) for item in chosen]
    parts: list[str] = []
    explain_dir, saliency_dir, saliency_error = (
        ctx.explain_dir, ctx.saliency_dir, ctx.saliency_error
    )
    summary = {
        (row.get("id"), row.get("direction")): row
        for row in _read_csv(ctx.files.get("explain_summary"))
    }
    if explain_dir is None:
        parts.append(_note("simulator not fitted yet: no simulated images to show"))
    if saliency_dir is None:
        parts.append(_note("no saliency maps" + (f": {saliency_error}" if saliency_error
                                                 else "")))
    parts.append(
        "<p>Each panel: original, simulated, their difference and the volume change of the "
        "anatomy (percent, red grows, blue shrinks). Saliency maps (magnitude, no sign) "
        "beside them. An explanation is valid when the logit moved past the margin and the "
        "warp folds nowhere; invalid ones are marked NOT VALID and left out of group "
        "maps.</p>"
    )
    for item, id_ in zip(chosen, ids, strict=True):
        prefix = derivative_id(id_)  # the id of explain's outputs and summary rows
        label = "diseased" if int(item.get("label", 0)) == 1 else "healthy"
        parts.append(f'<div class="subject"><h3>{_e(id_)} <span class="muted">(label: '
                     f"{_e(label)})</span></h3>")
        rows = []
        for direction in ("remove", "inject"):
            row = summary.get((prefix, direction))
            if row:
                rows.append([direction, _number(row.get("logit_before", "")),
                             _number(row.get("logit_after", "")),
                             row.get("moved_by_margin", ""), row.get("valid", ""),
                             _number(row.get("mean_abs_log_volume_change", ""))])
        if rows:
            parts.append(_table(["direction", "logit before", "logit after", "moved past margin",
                                 "valid", "mean |log volume change|"], rows))
        figures = []
        if explain_dir is not None:
            for direction in ("remove", "inject"):
                path = explain_dir / output_name(prefix, direction, "panel")
                invalid = (summary.get((prefix, direction)) or {}).get("valid") == "False"
                if path.is_file():
                    figures.append(_image_file(path, f"{id_} {direction}", (
                        "NOT VALID: " if invalid else "") + DIRECTION_WORDS[direction]))
        if saliency_dir is not None and (saliency_dir / f"{id_}_saliency.png").is_file():
            figures.append(_image_file(saliency_dir / f"{id_}_saliency.png",
                                       f"{id_} saliency", "saliency baselines"))
        if explain_dir is not None:
            for direction in ("remove", "inject"):
                gif = explain_dir / output_name(prefix, direction, "progression")
                if gif.is_file():
                    figures.append(_image_file(gif, f"{id_} {direction} progression",
                                               f"progression, {direction}"))
        parts.append('<div class="row">' + "".join(figures) + "</div></div>")
    source = []
    if explain_dir is not None:
        source.append("explanations: " + ("made for this report" if ctx.explain_made
                                          else str(explain_dir)))
    if saliency_dir is not None:
        source.append("saliency: " + ("made for this report (" + ", ".join(
            ctx.saliency_methods) + ")" if ctx.saliency_made
            else str(saliency_dir)))
    if source:
        parts.append(f'<p class="muted">{_e("; ".join(source))}</p>')
    return "\n".join(parts)


def _markdown_part(folders: list[Path], name: str, figures: tuple[str, ...]) -> str:
    """The tables (``name``) and figures of the first folder that has them, or ""."""
    for folder in folders:
        if (folder / name).is_file():
            shown = "".join(_image_file(folder / f, f, f.removesuffix(".png"))
                            for f in figures if (folder / f).is_file())
            return (markdown_to_html((folder / name).read_text(encoding="utf-8"))
                    + f'<div class="row">{shown}</div>'
                    + f'<p class="muted">from {_e(folder)}</p>')
    return ""


def _benchmark_section(ctx: ReportInputs) -> str:
    path = ctx.benchmark
    sanity = _markdown_part([ctx.run / "sanity"] + ([path.parent / "sanity"] if path else []),
                            "sanity.md", ("randomisation.png",))
    sanity += _markdown_part([ctx.run / "ensemble"], "ensemble.md", (
        "ensemble_inject_mean.png", "ensemble_inject_spread.png"))
    if path is not None and path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        figure = path.parent / "methods_figure.png"
        extra = (_image_file(figure, "benchmark methods figure", "methods vs the truth")
                 if figure.is_file() else "")
        return (markdown_to_html(text) + extra
                + f'<p class="muted">from {_e(path)}</p>' + sanity)
    return _note("no benchmark results yet (run `counterwarp benchmark`; it writes "
                 "results.md)") + sanity


def guarded_note(title: str, build: Callable[[], object]) -> str | None:
    """Run ``build``; None when it succeeds, else the note that replaces ``title``'s part.

    A failure in an optional part of the page becomes a note, not a crash.
    """
    try:
        build()
    except CounterwarpError as error:
        return _note(f"{title}: {error}")
    except Exception as error:  # noqa: BLE001 - the report must still be written
        return _note(f"{title} could not be built ({type(error).__name__}: {error})")
    return None


def _guarded(
    title: str, anchor: str, build: Callable[[ReportInputs], str], ctx: ReportInputs
) -> str:
    """One ``<section>``; a failure while making or rendering it becomes a note."""
    body = ctx.failed.get(anchor)
    if body is None:
        rendered: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body = guarded_note(title, lambda: rendered.append(build(ctx)))
        body = rendered[0] if body is None else body
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def render_report(ctx: ReportInputs, target: str | Path) -> Path:
    """Write the self-contained HTML page of ``ctx`` to ``target`` (atomically); its path."""
    run = ctx.run
    sections = [
        _guarded("Cohort and classifier", "cohort", _cohort_section, ctx),
        _guarded("Simulator", "simulator", _simulator_section, ctx),
        _guarded("Group maps", "group", _group_section, ctx),
        _guarded("Held-out subjects", "subjects", _subjects_section, ctx),
        _guarded("Benchmark", "benchmark", _benchmark_section, ctx),
    ]
    from counterwarp import __version__

    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = " &middot; ".join(
        f'<a href="#{anchor}">{_e(name)}</a>' for anchor, name in (
            ("cohort", "cohort"), ("simulator", "simulator"), ("group", "group maps"),
            ("subjects", "subjects"), ("benchmark", "benchmark"))
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>counterwarp report: {_e(run.resolve().name)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>counterwarp report</h1>
<p>run {_e(run.resolve())} &middot; written {_e(stamp)} &middot; counterwarp {_e(__version__)}</p>
</header>
<main>
<p class="muted">{nav}</p>
{chr(10).join(sections)}
<p class="muted">Volume change is the log volume change of the anatomy under the simulated
deformation (growth positive), shown as percent: 100 (exp(x) - 1). Group maps are tested by
sign flipping with family-wise error control (TFCE); the test is of the explanation's
consistency across subjects.</p>
</main>
</body>
</html>
"""
    return write_text_atomic(target, page)
