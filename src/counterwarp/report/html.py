"""``counterwarp report --run RUN``: one self-contained HTML page about a run.

The page embeds every image as a base64 ``data:`` URI and its style inline; it has no
scripts, fonts or links to load, so it opens from disk with no server and no network.
Every section is optional: what the run folder lacks is replaced by a short note
("simulator not fitted yet") instead of an error. All text taken from files is escaped.

Sections: cohort and classifier (``split.json``, ``classifier_metrics.json``,
``classifier_log.csv``); simulator fit (``simulator_fit.json``, ``simulator_log.csv``, the
demo's held-out assessment when present); group maps (``RUN/group``, computed with
:func:`counterwarp.workflows.group.group_run` when absent and a simulator exists);
per-subject panels of a few held-out subjects for both directions with saliency baselines
beside them (reused from an ``explain`` / ``saliency`` folder, otherwise made now); the
benchmark table (``results.md``) when present.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from counterwarp._io import write_text_atomic
from counterwarp.errors import CounterwarpError

__all__ = ["REPORT_NAME", "markdown_to_html", "report_run"]

REPORT_NAME = "report.html"
GROUP_FOLDER = "group"
REPORT_SALIENCY_METHODS = ("gradient", "integrated_gradients", "gradcam")
DIRECTION_WORDS = {"remove": "remove (healthier)", "inject": "inject (more diseased)"}

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


# --------------------------------------------------------------------------- html helpers


def _e(value: Any) -> str:
    """Escaped text of any value."""
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            css = ' class="num"' if numeric else ""
            cells.append(f"<td{css}>{_e(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _image_file(path: Path, alt: str, caption: str = "") -> str:
    """``<figure>`` embedding a PNG / GIF file."""
    mime = "image/gif" if path.suffix.lower() == ".gif" else "image/png"
    return _image(_data_uri(path.read_bytes(), mime), alt, caption)


def _image(uri: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{_e(alt)}">{cap}</figure>'


def _figure_uri(fig: Any, dpi: int = 90) -> str:
    """A matplotlib figure as a PNG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return _data_uri(buffer.getvalue(), "image/png")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


_INLINE_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_BULLET = re.compile(r"^\s*[-*]\s+")


def _inline(text: str) -> str:
    """Escape ``text``, then render `code` and **bold**."""
    escaped = _e(text)
    escaped = _INLINE_CODE.sub(r"<code>\1</code>", escaped)
    return _BOLD.sub(r"<strong>\1</strong>", escaped)


_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")


def _split_row(line: str) -> list[str]:
    """Cells of a Markdown table row; ``\\|`` inside a cell is a literal pipe."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SEPARATOR.split(body)]


def markdown_to_html(text: str) -> str:
    """Render the Markdown a benchmark writes (headings, pipe tables, lists, paragraphs).

    Everything is escaped; links and images are kept as text (the report loads nothing).
    """
    out: list[str] = []
    lines = text.splitlines()
    index = 0
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    while index < len(lines):
        line = lines[index].rstrip()
        stripped = line.strip()
        if stripped.startswith("|"):
            flush()
            block = []
            while index < len(lines) and lines[index].strip().startswith("|"):
                block.append(_split_row(lines[index]))
                index += 1
            separator = len(block) > 1 and all(
                re.fullmatch(r":?-{1,}:?", cell.replace(" ", "")) for cell in block[1] if cell
            )
            header, rows = (block[0], block[2:]) if separator else ([], block)
            right = [cell.strip().endswith(":") for cell in block[1]] if separator else []

            def cell(tag: str, column: int, value: str, right: list[bool] = right) -> str:
                css = ' class="num"' if column < len(right) and right[column] else ""
                return f"<{tag}{css}>{_inline(value)}</{tag}>"

            head = "".join(cell("th", i, c) for i, c in enumerate(header))
            body = "".join(
                "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>"
                for row in rows
            )
            thead = f"<thead><tr>{head}</tr></thead>" if header else ""
            out.append(f"<table>{thead}<tbody>{body}</tbody></table>")
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if heading:
            flush()
            level = min(6, len(heading.group(1)) + 2)
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif re.match(r"^[-*]\s+", stripped):
            flush()
            items = []
            while index < len(lines) and _BULLET.match(lines[index]):
                item = _BULLET.sub("", lines[index])
                items.append(f"<li>{_inline(item)}</li>")
                index += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        elif not stripped:
            flush()
        else:
            paragraph.append(stripped)
        index += 1
    flush()
    return "\n".join(out)


# --------------------------------------------------------------------------- sections


class _Context:
    """What the sections share: paths, the split, and lazily loaded models."""

    def __init__(self, run: Path, options: dict[str, Any]) -> None:
        self.run = run
        self.options = options
        self.split = _read_json(run / "split.json")
        self.has_classifier = (run / "classifier.pt").is_file()
        self.has_simulator = (run / "simulator.pt").is_file()
        self.tmp = Path(tempfile.mkdtemp(prefix="counterwarp-report-"))

    @property
    def manifest(self) -> Path | None:
        value = (self.split or {}).get("manifest")
        return Path(value) if value else None

    @property
    def cohort(self) -> Path | None:
        return self.manifest.parent if self.manifest is not None else None


def _cohort_section(ctx: _Context) -> str:
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
    cohort = _read_json(ctx.cohort / "cohort.json") if ctx.cohort is not None else None
    if cohort is not None and cohort.get("generator", "").startswith("counterwarp"):
        parts.append(
            f"<p>Synthetic cohort built from the MNI152 template (images in template space): "
            f"{_e(cohort.get('n'))} subjects, {_e(cohort.get('n_diseased'))} diseased, "
            f"{_e(cohort.get('dim'))}D grid {_e(cohort.get('shape'))} at "
            f"{_e(_fmt(cohort.get('spacing_mm')))} mm, effect strength "
            f"{_e(cohort.get('effect'))}, seed {_e(cohort.get('seed'))}.</p>"
        )
    metrics = _read_json(ctx.run / "classifier_metrics.json")
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
    log = _read_csv(ctx.run / "classifier_log.csv")
    if log:
        from counterwarp.report.figures import classifier_curves_figure

        parts.append(_image(_figure_uri(classifier_curves_figure(log)),
                            "classifier training curves",
                            "classifier training: loss per epoch, validation AUC and "
                            "balanced accuracy"))
    return "\n".join(parts)


def _simulator_section(ctx: _Context) -> str:
    fit = _read_json(ctx.run / "simulator_fit.json")
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
    log = _read_csv(ctx.run / "simulator_log.csv")
    if log:
        from counterwarp.report.figures import simulator_curves_figure

        parts.append(_image(_figure_uri(simulator_curves_figure(log)),
                            "simulator training curves",
                            "simulator training: loss terms per step (log scale) and the "
                            "share of each batch moved past the margin"))
    else:
        parts.append(_note("no simulator_log.csv in the run"))
    demo = _read_json(ctx.run.parent / "demo_summary.json")
    held = (demo or {}).get("held_out")
    if isinstance(held, dict):
        parts.append("<h3>Held-out assessment (demo)</h3>")
        parts.append(_table(["measure", "value"], [[k, v] for k, v in held.items()]))
    return "\n".join(parts)


def _auto_atlas(ctx: _Context) -> tuple[Path | None, Path | None]:
    """The synthetic cohort's effect-region atlas, when the run's cohort has one."""
    if ctx.cohort is None:
        return None, None
    atlas = ctx.cohort / "truth" / "effect_regions.nii.gz"
    names = ctx.cohort / "truth" / "effect_regions.csv"
    if not atlas.is_file():
        return None, None
    return atlas, names if names.is_file() else None


def _group_section(ctx: _Context) -> str:
    from counterwarp.workflows.group import group_run

    folder = Path(ctx.options.get("group_dir") or ctx.run / GROUP_FOLDER)
    parts: list[str] = [
        "<p>Mean log volume change of the held-out subjects per direction, shown as percent "
        "volume change (red: the anatomy grows, blue: it shrinks), over the mean anatomy; "
        "right: only voxels where Benjamini-Hochberg FDR keeps the one-sample t test.</p>"
    ]
    for direction in ("inject", "remove"):
        summary = _read_json(folder / f"group_{direction}_summary.json")
        if summary is None and ctx.has_simulator and ctx.options.get("compute", True):
            atlas, names = _auto_atlas(ctx)
            try:
                summary = group_run(ctx.run, folder, direction=direction, atlas=atlas,
                                    atlas_names=names, progress=ctx.options["progress"])
            except CounterwarpError as error:
                parts.append(_note(f"group maps ({direction}) could not be computed: {error}"))
                continue
        if summary is None:
            parts.append(_note(
                f"no group maps for {direction}: simulator not fitted yet" if not
                ctx.has_simulator else f"no group maps for {direction} in {folder}"
            ))
            continue
        parts.append(f"<h3>{_e(DIRECTION_WORDS[direction])}</h3>")
        parts.append(
            f"<p>{_e(summary.get('n_subjects'))} subjects; space: {_e(summary.get('space'))}. "
            f"{_e(summary.get('n_fdr_voxels'))} of {_e(summary.get('n_brain_voxels'))} brain "
            f"voxels survive FDR q = {_e(summary.get('q'))} "
            f"({_e(summary.get('n_fdr_voxels_positive'))} growing, "
            f"{_e(summary.get('n_fdr_voxels_negative'))} shrinking).</p>"
        )
        figures = [folder / f"group_{direction}_mean.png",
                   folder / f"group_{direction}_mean_fdr.png"]
        shown = [
            _image_file(path, f"group {direction} map", caption)
            for path, caption in zip(figures, ("mean", "FDR-significant voxels"), strict=True)
            if path.is_file()
        ]
        parts.append('<div class="row">' + "".join(shown) + "</div>" if shown
                     else _note("group figures missing"))
        regions = _read_csv(folder / f"group_{direction}_regions.csv")
        if regions:
            keys = ["name", "mean_log_volume_change", "percent_volume_change", "n_voxels", "t",
                    "p"]
            rows = [[_number(row.get(k, "")) for k in keys] for row in regions]
            parts.append("<p>Mean per region, sorted by |effect| ('outside' = brain voxels in "
                         "no region):</p>")
            parts.append(_table(keys, rows))
    parts.append(f'<p class="muted">NIfTI maps (mean, t, p, FDR mask) in {_e(folder)}</p>')
    return "\n".join(parts)


def _number(text: str) -> Any:
    """A CSV cell as int / float when it is one, else the text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _held_out_subjects(ctx: _Context, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` test-split items, alternating diseased and healthy."""
    items = list((ctx.split or {}).get("test") or [])
    diseased = [item for item in items if int(item.get("label", 0)) == 1]
    healthy = [item for item in items if int(item.get("label", 0)) != 1]
    chosen: list[dict[str, Any]] = []
    while len(chosen) < count and (diseased or healthy):
        for pool in (diseased, healthy):
            if pool and len(chosen) < count:
                chosen.append(pool.pop(0))
    return chosen


def _find_folder(given: Any, candidates: list[Path], probe: Callable[[Path], bool]) -> Path | None:
    for folder in ([Path(given)] if given else candidates):
        if folder.is_dir() and probe(folder):
            return folder
    return None


def _subjects_section(ctx: _Context) -> str:
    from counterwarp.data.manifest import image_id

    count = int(ctx.options.get("n_subjects", 4))
    chosen = _held_out_subjects(ctx, count)
    if not chosen:
        return _note("no held-out subjects: the run has no split.json test part yet")
    paths = [Path(item["path"]) for item in chosen]
    ids = [image_id(path) for path in paths]
    parts: list[str] = []

    def has_panels(folder: Path) -> bool:
        return all((folder / f"{i}_{d}.png").is_file() for i in ids for d in ("remove", "inject"))

    explain_dir = _find_folder(ctx.options.get("explain_dir"),
                               [ctx.run.parent / "explain", ctx.run / "explain"], has_panels)
    if explain_dir is None and ctx.has_simulator and ctx.options.get("compute", True):
        from counterwarp.workflows.explain import explain_run

        explain_dir = ctx.tmp / "explain"
        explain_run(ctx.run, explain_dir, images=paths, direction="both",
                    progress=ctx.options["progress"])
    summary = {
        (row.get("id"), row.get("direction")): row
        for row in (_read_csv(explain_dir / "summary.csv") if explain_dir else [])
    }

    def has_saliency(folder: Path) -> bool:
        return all((folder / f"{i}_saliency.png").is_file() for i in ids)

    saliency_dir = _find_folder(ctx.options.get("saliency_dir"),
                                [ctx.run.parent / "saliency", ctx.run / "saliency"],
                                has_saliency)
    saliency_error = None
    if saliency_dir is None and ctx.has_classifier and ctx.options.get("compute", True):
        from counterwarp.workflows.saliency import saliency_run

        try:
            saliency_dir = ctx.tmp / "saliency"
            saliency_run(ctx.run, saliency_dir, methods=list(REPORT_SALIENCY_METHODS),
                         images=paths, progress=ctx.options["progress"])
        except CounterwarpError as error:
            saliency_dir, saliency_error = None, str(error)
    if explain_dir is None:
        parts.append(_note("simulator not fitted yet: no simulated images to show"))
    if saliency_dir is None:
        parts.append(_note("no saliency maps" + (f": {saliency_error}" if saliency_error
                                                 else "")))
    parts.append(
        "<p>Each panel: original, simulated, their difference and the volume change of the "
        "anatomy (percent, red grows, blue shrinks). Saliency maps (magnitude, no sign) "
        "beside them.</p>"
    )
    for item, id_ in zip(chosen, ids, strict=True):
        label = "diseased" if int(item.get("label", 0)) == 1 else "healthy"
        parts.append(f'<div class="subject"><h3>{_e(id_)} <span class="muted">(label: '
                     f"{_e(label)})</span></h3>")
        rows = []
        for direction in ("remove", "inject"):
            row = summary.get((id_, direction))
            if row:
                rows.append([direction, _number(row.get("logit_before", "")),
                             _number(row.get("logit_after", "")),
                             row.get("moved_by_margin", ""),
                             _number(row.get("mean_abs_log_volume_change", ""))])
        if rows:
            parts.append(_table(["direction", "logit before", "logit after", "moved past margin",
                                 "mean |log volume change|"], rows))
        figures = []
        if explain_dir is not None:
            for direction in ("remove", "inject"):
                path = explain_dir / f"{id_}_{direction}.png"
                if path.is_file():
                    figures.append(_image_file(path, f"{id_} {direction}",
                                               DIRECTION_WORDS[direction]))
        if saliency_dir is not None and (saliency_dir / f"{id_}_saliency.png").is_file():
            figures.append(_image_file(saliency_dir / f"{id_}_saliency.png",
                                       f"{id_} saliency", "saliency baselines"))
        if explain_dir is not None:
            for direction in ("remove", "inject"):
                gif = explain_dir / f"{id_}_{direction}_progression.gif"
                if gif.is_file():
                    figures.append(_image_file(gif, f"{id_} {direction} progression",
                                               f"progression, {direction}"))
        parts.append('<div class="row">' + "".join(figures) + "</div></div>")
    source = []
    if explain_dir is not None:
        source.append("explanations: " + ("made for this report" if ctx.tmp in explain_dir.parents
                                          else str(explain_dir)))
    if saliency_dir is not None:
        source.append("saliency: " + ("made for this report (" + ", ".join(
            REPORT_SALIENCY_METHODS) + ")" if ctx.tmp in saliency_dir.parents
            else str(saliency_dir)))
    if source:
        parts.append(f'<p class="muted">{_e("; ".join(source))}</p>')
    return "\n".join(parts)


def _benchmark_section(ctx: _Context) -> str:
    given = ctx.options.get("benchmark")
    candidates = []
    if given:
        given = Path(given)
        candidates.append(given / "results.md" if given.is_dir() else given)
    else:
        candidates += [ctx.run / "benchmark" / "results.md",
                       ctx.run.parent / "benchmark" / "results.md"]
    for path in candidates:
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            figure = path.parent / "methods_figure.png"
            extra = (_image_file(figure, "benchmark methods figure", "methods vs the truth")
                     if figure.is_file() else "")
            return (markdown_to_html(text) + extra
                    + f'<p class="muted">from {_e(path)}</p>')
    return _note("no benchmark results yet (run `counterwarp benchmark`; it writes results.md)")


def _guarded(title: str, anchor: str, build: Callable[[_Context], str], ctx: _Context) -> str:
    """One ``<section>``; a failure in an optional part becomes a note, not a crash."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body = build(ctx)
    except CounterwarpError as error:
        body = _note(f"{title}: {error}")
    except Exception as error:  # noqa: BLE001 - the report must still be written
        body = _note(f"{title} could not be built ({type(error).__name__}: {error})")
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def report_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    explain_dir: str | Path | None = None,
    saliency_dir: str | Path | None = None,
    group_dir: str | Path | None = None,
    benchmark: str | Path | None = None,
    n_subjects: int = 4,
    compute: bool = True,
    progress: bool = False,
) -> Path:
    """Write the run's self-contained HTML report and return its path.

    Args:
        run: run folder.
        out: output file (default ``RUN/report.html``).
        explain_dir: folder of ``counterwarp explain`` outputs to reuse (default: the first of
            ``RUN/../explain``, ``RUN/explain`` that has panels for the chosen subjects).
        saliency_dir: folder of ``counterwarp saliency`` outputs to reuse (default
            ``RUN/../saliency`` or ``RUN/saliency``).
        group_dir: folder of group maps (default ``RUN/group``; computed there when absent
            and the run has a simulator).
        benchmark: ``results.md`` or a folder holding it (default ``RUN/benchmark`` or
            ``RUN/../benchmark``).
        n_subjects: held-out subjects to show (alternating diseased / healthy).
        compute: make missing group maps, panels and saliency maps with the run's models;
            False only embeds what exists.
        progress: show progress bars while computing.

    Raises:
        CounterwarpError: ``run`` is not a folder.
    """
    run = Path(run).expanduser()
    if not run.is_dir():
        raise CounterwarpError(f"--run {run}: no such run folder")
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, int) or n_subjects < 0:
        raise CounterwarpError(f"n_subjects must be a non-negative integer, got {n_subjects!r}")
    target = Path(out).expanduser() if out is not None else run / REPORT_NAME
    options = {
        "explain_dir": explain_dir, "saliency_dir": saliency_dir, "group_dir": group_dir,
        "benchmark": benchmark, "n_subjects": n_subjects, "compute": compute,
        "progress": progress,
    }
    ctx = _Context(run, options)
    try:
        sections = [
            _guarded("Cohort and classifier", "cohort", _cohort_section, ctx),
            _guarded("Simulator", "simulator", _simulator_section, ctx),
            _guarded("Group maps", "group", _group_section, ctx),
            _guarded("Held-out subjects", "subjects", _subjects_section, ctx),
            _guarded("Benchmark", "benchmark", _benchmark_section, ctx),
        ]
    finally:
        import shutil

        shutil.rmtree(ctx.tmp, ignore_errors=True)
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
deformation (growth positive), shown as percent: 100 (exp(x) - 1). Group maps are voxel-wise
one-sample t tests with Benjamini-Hochberg FDR control.</p>
</main>
</body>
</html>
"""
    return write_text_atomic(target, page)
