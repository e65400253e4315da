"""``counterwarp demo``: the whole pipeline on the embedded synthetic cohort.

synth -> train-classifier -> fit -> explain (held-out subjects) -> assessment against the
known truth. Default sizes end within 10 minutes on 2 CPU cores; ``quick`` (2D) within 2.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from counterwarp._io import folder_lock, output_transaction, owned_files, write_json_atomic
from counterwarp.data.synthetic import synth
from counterwarp.data.truth import BRAIN_MASK_NAME, EFFECT_NAME, TRUTH_DIR
from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import assess_simulator
from counterwarp.train.classifier import train_classifier
from counterwarp.workflows.explain import explain_run
from counterwarp.workflows.fit import fit_run
from counterwarp.workflows.folder import (
    DEMO_SUMMARY_NAME,
    SIMULATOR_NAME,
    load_images,
    load_run_simulator,
    model_shape,
    rows_in_split,
)
from counterwarp.workflows.report import report_run

DEMO_SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "synth": {"n": 200, "dim": 3, "shape": (32, 32, 32)},
        "classifier": {"epochs": 30},
        "fit": {"steps": 600},
    },
    "quick": {
        "synth": {"n": 160, "dim": 2, "shape": (64, 64)},
        "classifier": {"epochs": 30},
        "fit": {"steps": 600},
    },
}


def _read_map(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32)


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, progress: bool = True, seed: int = 0,
    sizes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the pipeline into ``out`` (``cohort/``, ``run/``, ``explain/``) and summarise it.

    Returns the summary also written to ``out/demo_summary.json``.

    The demo holds ``out``'s lock from start to end (a second demo into ``out`` is refused
    at once), each step the lock of its own folder; a ``demo_summary.json`` in ``out`` that
    no counterwarp command wrote is refused before any work.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder; choose a folder path")
    with folder_lock(out, "a demo"):
        summary_file = out / DEMO_SUMMARY_NAME
        if summary_file.exists() and DEMO_SUMMARY_NAME not in owned_files(out):
            raise CounterwarpError(
                f"{summary_file} exists and was not written there by counterwarp; move it "
                f"away, or choose another --out"
            )
        return _demo_into(out, quick, progress, seed, sizes)


def _demo_into(
    out: Path, quick: bool, progress: bool, seed: int, sizes: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    """The body of :func:`run_demo`, run while holding ``out``'s lock."""
    plan = sizes or DEMO_SIZES["quick" if quick else "full"]
    cohort, run, explained = out / "cohort", out / "run", out / "explain"
    timings: dict[str, float] = {}

    def step(name: str) -> float:
        print(f"[demo] {name} ...", flush=True)
        return time.perf_counter()

    started = step(f"synth -> {cohort}")
    manifest = synth(cohort, seed=seed, progress=progress, **plan["synth"])
    timings["synth_s"] = time.perf_counter() - started

    started = step(f"train-classifier -> {run}")
    classifier_metrics = train_classifier(  # a demo run is the demo's own: retrain it
        manifest, run, seed=seed, progress=progress, overwrite=True, **plan["classifier"]
    )
    timings["train_classifier_s"] = time.perf_counter() - started
    test = classifier_metrics["test"]
    print(f"[demo] classifier held-out: balanced accuracy {test['balanced_accuracy']:.3f}, "
          f"AUC {test['auc']:.3f}")

    started = step(f"fit simulator -> {run / SIMULATOR_NAME}")
    fit_summary = fit_run(manifest, run, seed=seed, progress=progress, **plan["fit"])
    timings["fit_s"] = time.perf_counter() - started

    started = step(f"explain held-out subjects -> {explained}")
    explain_run(run, explained, manifest=manifest, split="test", progress=progress)
    timings["explain_s"] = time.perf_counter() - started

    simulator, payload = load_run_simulator(run)
    rows = rows_in_split(run, manifest, "test")
    images, labels = load_images(rows, model_shape(payload), progress=False)
    truth = _read_map(cohort / TRUTH_DIR / EFFECT_NAME)
    mask = _read_map(cohort / TRUTH_DIR / BRAIN_MASK_NAME) > 0
    assessment = assess_simulator(simulator, images, labels, truth_effect=truth,
                                  brain_mask=mask)
    summary = {
        "out": str(out.resolve()),
        "classifier_test": test,
        "margin": fit_summary["margin"],
        "held_out": assessment,
        "timings": timings,
    }
    started = step("report")
    report = report_run(run, explain_dir=explained)
    timings["report_s"] = time.perf_counter() - started
    timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
    summary["report"] = str(report)
    with output_transaction(out, hint="move it away, or choose another --out"):
        write_json_atomic(out / DEMO_SUMMARY_NAME, summary)
    _print_summary(summary, explained)
    return summary


def _fmt(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _print_summary(summary: dict[str, Any], explained: Path) -> None:
    held = summary["held_out"]
    lines = [
        "",
        f"counterwarp demo finished in {summary['timings']['total_s']:.0f} s",
        f"  classifier (held-out): balanced accuracy "
        f"{_fmt(summary['classifier_test']['balanced_accuracy'])}, "
        f"AUC {_fmt(summary['classifier_test']['auc'])}",
        f"  margin: {_fmt(summary['margin'])} logits",
        f"  remove moved past margin: {_fmt(held['remove_moved_share'])} of "
        f"{held['n_predicted_diseased']} predicted diseased ({held['remove_flips']} flipped)",
        f"  inject moved past margin: {_fmt(held['inject_moved_share'])} of "
        f"{held['n_predicted_healthy']} predicted healthy ({held['inject_flips']} flipped)",
        f"  folding share: mean {held['folding_share_mean']:.4%}, "
        f"max {held['folding_share_max']:.4%}",
        f"  cycle error / image variance: {_fmt(held['cycle_error_relative'])}",
        f"  inject map vs true effect (Pearson): voxel "
        f"{_fmt(held.get('inject_truth_pearson_voxel'))}, region (sigma 1.5) "
        f"{_fmt(held.get('inject_truth_pearson_region'))}",
        f"  outputs: {explained} (NIfTI maps, PNG panels, summary.csv)",
        f"  summary: {Path(summary['out']) / 'demo_summary.json'}",
        f"  report:  {summary['report']}",
    ]
    print("\n".join(lines))
