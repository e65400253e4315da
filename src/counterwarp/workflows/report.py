"""``counterwarp report --run RUN``: gather what the page shows, then render it.

This module finds the outputs a run already has (group maps, ``explain`` and ``saliency``
folders, benchmark results) and, unless ``compute=False``, makes the missing ones with the
other workflows (:func:`~counterwarp.workflows.group.group_run`,
:func:`~counterwarp.workflows.explain.explain_run`,
:func:`~counterwarp.workflows.saliency.saliency_run`); the page itself is written by
:func:`counterwarp.report.html.render_report`, which only reads files that exist. A failure
while making an optional part becomes a note on the page, not an error.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from counterwarp._io import write_json_atomic, writing_folder
from counterwarp._io.provenance import PROVENANCE_NAME, merged_record, relative_to
from counterwarp.data.derivatives import derivative_id, output_name
from counterwarp.data.manifest import image_id
from counterwarp.data.truth import REGIONS_NAME, REGIONS_TABLE_NAME, TRUTH_DIR
from counterwarp.errors import CounterwarpError
from counterwarp.report.html import ReportInputs, guarded_note, render_report
from counterwarp.report.markup import read_json
from counterwarp.workflows.classifier import CONTRACT_NAME, read_record, same_source
from counterwarp.workflows.folder import (
    BENCHMARK_FOLDER,
    CLASSIFIER_LOG_NAME,
    CLASSIFIER_METRICS_NAME,
    CLASSIFIER_NAME,
    DEMO_SUMMARY_NAME,
    EXPLAIN_FOLDER,
    EXPLAIN_SUMMARY_NAME,
    FIT_METRICS_NAME,
    GROUP_FOLDER,
    LOG_NAME,
    REPORT_NAME,
    SALIENCY_FOLDER,
    SIMULATOR_NAME,
    SPLIT_NAME,
    check_provenance,
    read_split,
    run_digests,
)
from counterwarp.workflows.saliency import hookable_methods

__all__ = ["REPORT_SALIENCY_METHODS", "report_run"]

#: Saliency baselines made for the page when the run has no ``saliency`` folder.
REPORT_SALIENCY_METHODS: tuple[str, ...] = ("gradient", "integrated_gradients", "gradcam")
#: Panels made per held-out subject (``explain`` writes ``<id>_<direction>.png``).
PANEL_DIRECTIONS: tuple[str, ...] = ("remove", "inject")
SUBJECTS_TITLE = "Held-out subjects"


def held_out_subjects(split: dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` test-split items of ``split.json``, alternating diseased and healthy."""
    items = list((split or {}).get("test") or [])
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


def _cohort_atlas(cohort: Path | None) -> tuple[Path | None, Path | None]:
    """The synthetic cohort's effect-region atlas and its names, when the cohort has one."""
    if cohort is None:
        return None, None
    atlas = cohort / TRUTH_DIR / REGIONS_NAME
    names = cohort / TRUTH_DIR / REGIONS_TABLE_NAME
    if not atlas.is_file():
        return None, None
    return atlas, names if names.is_file() else None


def _make_group_maps(inputs: ReportInputs, compute: bool, progress: bool) -> None:
    """Group maps of both directions into ``inputs.group_dir`` where they are missing."""
    from counterwarp.workflows.group import group_run

    for direction in ("inject", "remove"):
        summary = inputs.group_dir / f"group_{direction}_summary.json"
        if summary.is_file() or not (inputs.has_simulator and compute):
            continue
        atlas, names = _cohort_atlas(inputs.cohort)
        try:
            try:
                group_run(inputs.run, inputs.group_dir, direction=direction, atlas=atlas,
                          atlas_names=names, progress=progress)
            except CounterwarpError as error:
                if "valid" not in str(error):
                    raise
                # too few valid explanations: map them all, the page says so
                group_run(inputs.run, inputs.group_dir, direction=direction, atlas=atlas,
                          atlas_names=names, progress=progress, valid_only=False)
        except CounterwarpError as error:
            inputs.group_errors[direction] = str(error)


def _gather_subjects(
    inputs: ReportInputs, options: dict[str, Any], tmp: Path
) -> None:
    """The held-out subjects' panels and saliency maps: found, or made into ``tmp``."""
    compute, progress = options["compute"], options["progress"]
    inputs.subjects = held_out_subjects(inputs.split, int(options["n_subjects"]))
    if not inputs.subjects:
        return
    run = inputs.run
    paths = [Path(item["path"]) for item in inputs.subjects]
    ids = [image_id(path) for path in paths]

    def has_panels(folder: Path) -> bool:
        return all((folder / output_name(derivative_id(i), d, "panel")).is_file()
                   for i in ids for d in PANEL_DIRECTIONS)

    inputs.explain_dir = _find_folder(
        options["explain_dir"], [run.parent / EXPLAIN_FOLDER, run / EXPLAIN_FOLDER], has_panels
    )
    if options["explain_dir"] is None and inputs.explain_dir is not None:
        try:
            check_provenance(inputs.explain_dir, run)
        except CounterwarpError:
            inputs.explain_dir = None  # found by looking, but made by an older simulator
    if inputs.explain_dir is None and inputs.has_simulator and compute:
        from counterwarp.workflows.explain import explain_run

        inputs.explain_dir = tmp / EXPLAIN_FOLDER
        inputs.explain_made = True
        explain_run(run, inputs.explain_dir, images=paths, direction="both", progress=progress)
    if inputs.explain_dir is not None:
        inputs.files["explain_summary"] = inputs.explain_dir / EXPLAIN_SUMMARY_NAME

    def has_saliency(folder: Path) -> bool:
        return all((folder / f"{i}_saliency.png").is_file() for i in ids)

    inputs.saliency_dir = _find_folder(
        options["saliency_dir"], [run.parent / SALIENCY_FOLDER, run / SALIENCY_FOLDER],
        has_saliency,
    )
    if inputs.saliency_dir is None and inputs.has_classifier and compute:
        from counterwarp.workflows.saliency import saliency_run

        try:
            inputs.saliency_dir = tmp / SALIENCY_FOLDER
            inputs.saliency_made = True
            methods = hookable_methods(list(REPORT_SALIENCY_METHODS),
                                       {"classifier": read_record(run)}, say=False)
            saliency_run(run, inputs.saliency_dir, methods=methods, images=paths,
                         progress=progress)
        except CounterwarpError as error:
            inputs.saliency_dir, inputs.saliency_error = None, str(error)


def _find_benchmark(run: Path, given: str | Path | None) -> Path | None:
    """The benchmark's ``results.md``: ``given`` (the file or its folder) or the run's own."""
    from counterwarp.workflows.benchmark import RESULTS_MD

    if given:
        given = Path(given)
        candidates = [given / RESULTS_MD if given.is_dir() else given]
    else:
        candidates = [run / BENCHMARK_FOLDER / RESULTS_MD,
                      run.parent / BENCHMARK_FOLDER / RESULTS_MD]
    return next((path for path in candidates if path.is_file()), None)


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
    classifier: Any = None,
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
        classifier: ``--classifier``; must be the classifier the run records.

    Raises:
        CounterwarpError: ``run`` is not a folder; a given ``explain_dir`` /
            ``saliency_dir`` is not a folder, or ``explain_dir`` was made by another
            simulator than the run's (``provenance.json``), or ``benchmark`` neither a file
            nor a folder holding ``results.md``; another process writes the report's folder
            (the report holds that folder's lock); ``out`` is a file that counterwarp did
            not write.
    """
    run = Path(run).expanduser()
    if not run.is_dir():
        raise CounterwarpError(f"--run {run}: no such run folder")
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, int) or n_subjects < 0:
        raise CounterwarpError(f"n_subjects must be a non-negative integer, got {n_subjects!r}")
    _check_given_inputs(explain_dir, saliency_dir, benchmark)
    if classifier is not None and not same_source(read_record(run), classifier):
        raise CounterwarpError(
            f"--classifier {classifier.where} is not the classifier {run} records; leave "
            "--classifier out to report on the run's own"
        )
    if explain_dir is not None and (run / SIMULATOR_NAME).is_file():
        check_provenance(Path(explain_dir).expanduser(), run)  # made by the run's simulator?
    target = Path(out).expanduser() if out is not None else run / REPORT_NAME
    if target.is_dir():
        raise CounterwarpError(f"--out {target} is a folder; give the HTML file to write")
    with writing_folder(target.parent, "a report", hint="move it away, or choose another --out"):
        written = _report_into(run, target, explain_dir, saliency_dir, group_dir, benchmark,
                               n_subjects, compute, progress)
        if target.parent.resolve() != run.resolve():  # the run keeps its own record
            write_json_atomic(target.parent / PROVENANCE_NAME, merged_record(
                target.parent, "report", {"run": relative_to(run, target.parent),
                                          "report": target.name, **run_digests(run)}))
        return written


def _check_given_inputs(
    explain_dir: str | Path | None, saliency_dir: str | Path | None,
    benchmark: str | Path | None,
) -> None:
    """Refuse a given ``--explain`` / ``--saliency`` folder or ``--benchmark`` that does not
    exist (instead of silently making or leaving out that part of the page)."""
    from counterwarp.workflows.benchmark import RESULTS_MD

    for flag, folder, command in (("--explain", explain_dir, "explain"),
                                  ("--saliency", saliency_dir, "saliency")):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise CounterwarpError(
                f"{flag} {folder}: no such folder; give the --out folder of `counterwarp "
                f"{command}`, or leave {flag} out to find or make one"
            )
    if benchmark is None:
        return
    given = Path(benchmark).expanduser()
    if not given.exists():
        raise CounterwarpError(
            f"--benchmark {benchmark}: no such file or folder; give the --out folder of "
            f"`counterwarp benchmark` or its {RESULTS_MD}"
        )
    if given.is_dir() and not (given / RESULTS_MD).is_file():
        raise CounterwarpError(
            f"--benchmark {benchmark}: the folder holds no {RESULTS_MD}; give the --out "
            f"folder of `counterwarp benchmark`"
        )


def _split_or_none(run: Path) -> dict[str, Any] | None:
    """The run's split with its paths resolved, or None when it has none (or an unreadable
    one: the report then says the classifier is not trained yet)."""
    if read_json(run / SPLIT_NAME) is None:
        return None
    try:
        return read_split(run)
    except CounterwarpError:
        return None


def _report_into(
    run: Path, target: Path, explain_dir: str | Path | None, saliency_dir: str | Path | None,
    group_dir: str | Path | None, benchmark: str | Path | None, n_subjects: int,
    compute: bool, progress: bool,
) -> Path:
    """The body of :func:`report_run`, run while holding the lock of the report's folder."""
    inputs = ReportInputs(
        run=run,
        group_dir=Path(group_dir or run / GROUP_FOLDER),
        split=_split_or_none(run),
        has_classifier=(run / CLASSIFIER_NAME).is_file() or (run / CONTRACT_NAME).is_file(),
        has_simulator=(run / SIMULATOR_NAME).is_file(),
        files={
            "classifier_metrics": run / CLASSIFIER_METRICS_NAME,
            "classifier_log": run / CLASSIFIER_LOG_NAME,
            "simulator_fit": run / FIT_METRICS_NAME,
            "simulator_log": run / LOG_NAME,
            "demo_summary": run.parent / DEMO_SUMMARY_NAME,
        },
        saliency_methods=REPORT_SALIENCY_METHODS,
    )
    options = {
        "explain_dir": explain_dir, "saliency_dir": saliency_dir, "n_subjects": n_subjects,
        "compute": compute, "progress": progress,
    }
    tmp = Path(tempfile.mkdtemp(prefix="counterwarp-report-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            note = guarded_note("Group maps", lambda: _make_group_maps(inputs, compute, progress))
            if note is not None:
                inputs.failed["group"] = note
            note = guarded_note(SUBJECTS_TITLE, lambda: _gather_subjects(inputs, options, tmp))
            if note is not None:
                inputs.failed["subjects"] = note
        inputs.benchmark = _find_benchmark(run, benchmark)
        return render_report(inputs, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
