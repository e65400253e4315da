"""``counterwarp fit``: fit the simulator for a run folder's classifier, swapped in whole."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from counterwarp import distributed
from counterwarp._io import folder_lock, remove_stale_temps, write_json_atomic
from counterwarp._io.provenance import (
    PROVENANCE_NAME,
    file_digest,
    merged_record,
    relative_to,
    staged_digests,
)
from counterwarp.data.manifest import resolve_manifest_path
from counterwarp.explain.simulator import Simulator
from counterwarp.train.common import choose_device
from counterwarp.train.staging import FIT_STAGING, Staging, disk_errors, recover_run
from counterwarp.workflows.classifier import (
    CONTRACT_NAME,
    ClassifierSource,
    classifier_digest,
    record_digest,
    stage_source,
)
from counterwarp.workflows.folder import (
    CHECKPOINT_NAME,
    FIT_METRICS_NAME,
    LOG_NAME,
    SIMULATOR_NAME,
    SPLIT_NAME,
    draw_split,
    load_images,
    load_run_classifier,
    model_preprocessing,
    model_shape,
    rows_in_split,
    select_rows,
    split_on_disk,
)


@distributed.in_process_group
def fit_run(
    manifest: str | Path,
    run: str | Path,
    *,
    split: str = "train+val",
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    classifier: ClassifierSource | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Fit the simulator for the run's classifier on the ``split`` images of ``manifest``.

    Writes ``RUN/simulator.pt``, ``RUN/simulator_fit.json`` (settings, derived margin, final
    shares), ``RUN/simulator_log.csv`` (every step's losses) and
    ``RUN/simulator_checkpoint.pt``, each recording the sha256 of the ``classifier.pt`` it
    was fitted for. All four are written into ``RUN/.fit-staging`` and swapped in together
    when the fit completes: a fit that fails (a NaN, a full disk, an exception) or is killed
    leaves every file of the run as it was, and its progress in ``RUN/.fit-staging``, which
    ``resume`` continues from (else from ``RUN/simulator_checkpoint.pt``); a fit without
    ``resume`` discards that staged progress first. ``resume`` with a larger ``steps``
    extends a finished fit (constant learning rate only).

    ``classifier`` (``--classifier``: a model counterwarp did not train) is checked, fitted
    for, and recorded in the run with the simulator (``RUN/classifier.json`` and a copy of
    its file, see :mod:`counterwarp.workflows.classifier`); a run without ``split.json``
    then gets the subject-level split ``train-classifier`` would draw (seed 0), so the
    simulator's held-out test part exists.

    Under torchrun every rank trains (see :mod:`counterwarp.distributed`) and rank 0 alone
    takes the folder lock and writes; every rank returns the same summary.
    """
    run = Path(run)
    group = distributed.current()
    progress = progress and group.is_main
    source = classifier
    classifier, payload = load_run_classifier(run, source=source)
    classifier_sha256 = record_digest(source) if source else classifier_digest(run)
    simulator = Simulator(**settings)  # validates the settings before any work
    if device is not None:
        choose_device(device)  # an unknown device name is a user error, not a traceback
    new_split = None
    if source is not None and not (run / SPLIT_NAME).is_file():
        new_split = draw_split(manifest, payload.get("positive_label"))
    rows = (select_rows(new_split, manifest, split, payload.get("positive_label"))
            if new_split else
            rows_in_split(run, manifest, split, positive_label=payload.get("positive_label")))
    images, _ = load_images(rows, model_shape(payload), progress=progress,
                            preprocessing=model_preprocessing(payload))
    lock = folder_lock(run, "a simulator") if group.is_main else contextlib.nullcontext()
    staging = Staging(run, FIT_STAGING)
    note = (f"the run folder {run} is unchanged; this fit's progress is kept in "
            f"{staging.folder} (`--resume` continues from it; delete it to free space)")
    with lock:
        if group.is_main:
            recover_run(run)  # finish a swap a killed command left half done
            # temporaries of a fit killed mid-write (only fit writes these names, under the lock)
            remove_stale_temps(
                run, (CHECKPOINT_NAME, LOG_NAME, SIMULATOR_NAME, FIT_METRICS_NAME)
            )
        group.barrier()
        bindings = {"classifier_sha256": classifier_sha256}
        simulator.fit(
            classifier, images, run_dir=run, resume=resume, progress=progress, device=device,
            bindings=bindings, swap_in=False,
        )
        summary = {
            "manifest": relative_to(resolve_manifest_path(manifest), run),
            "split": split,
            "n_images": int(images.shape[0]),
            "margin": simulator.margin_,
            "margin_rule": (
                "given" if simulator.config.margin is not None
                else f"{simulator.config.margin_sd} x sd of training logits"
            ),
            "logit_mean": simulator.logit_mean_,
            "logit_std": simulator.logit_std_,
            "settings": simulator.config.to_dict(),
            "output": (payload.get("contract") or {}).get("output", "logit"),
            "unit": (payload.get("contract") or {}).get("unit"),
            "final_step": simulator.history_[-1] if simulator.history_ else {},
            **bindings,
        }
        if group.is_main:
            with disk_errors(run / SIMULATOR_NAME, note):
                simulator.save(staging / SIMULATOR_NAME, extra=bindings)
            with disk_errors(run / FIT_METRICS_NAME, note):
                write_json_atomic(staging / FIT_METRICS_NAME, summary)
            brought: list[str] = []
            if source is not None:
                with disk_errors(run / CONTRACT_NAME, note):
                    brought = stage_source(source, staging.folder)
            if new_split is not None:
                with disk_errors(run / SPLIT_NAME, note):
                    write_json_atomic(staging / SPLIT_NAME, split_on_disk(new_split, run))
                brought.append(SPLIT_NAME)
            split_file = staging / SPLIT_NAME if new_split is not None else run / SPLIT_NAME
            with disk_errors(run / PROVENANCE_NAME, note):
                write_json_atomic(staging / PROVENANCE_NAME, merged_record(run, "fit", {
                    "seed": simulator.config.seed, **bindings,
                    **staged_digests(staging.folder, resolve_manifest_path(manifest),
                                     (SIMULATOR_NAME,)),
                    **({"split_sha256": file_digest(split_file)} if split_file.is_file()
                       else {}),
                }))
            staging.commit([*brought, LOG_NAME, CHECKPOINT_NAME, FIT_METRICS_NAME,
                            SIMULATOR_NAME, PROVENANCE_NAME])
        group.barrier()
    return summary
