"""``counterwarp fit``: fit the simulator for a run folder's classifier."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from counterwarp import distributed
from counterwarp._io import folder_lock, remove_stale_temps, write_json_atomic
from counterwarp.explain.simulator import Simulator
from counterwarp.train.common import choose_device
from counterwarp.workflows.folder import (
    CHECKPOINT_NAME,
    FIT_METRICS_NAME,
    LOG_NAME,
    SIMULATOR_NAME,
    load_images,
    load_run_classifier,
    model_shape,
    rows_in_split,
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
    **settings: Any,
) -> dict[str, Any]:
    """Fit the simulator for the run's classifier on the ``split`` images of ``manifest``.

    Writes ``RUN/simulator.pt``, ``RUN/simulator_fit.json`` (settings, derived margin, final
    shares), ``RUN/simulator_log.csv`` (every step's losses) and checkpoints. Under torchrun
    every rank trains (see :mod:`counterwarp.distributed`) and rank 0 alone takes the folder
    lock and writes; every rank returns the same summary.
    """
    run = Path(run)
    group = distributed.current()
    progress = progress and group.is_main
    classifier, payload = load_run_classifier(run)
    simulator = Simulator(**settings)  # validates the settings before any work
    if device is not None:
        choose_device(device)  # an unknown device name is a user error, not a traceback
    rows = rows_in_split(run, manifest, split, positive_label=payload.get("positive_label"))
    images, _ = load_images(rows, model_shape(payload), progress=progress)
    lock = folder_lock(run, "a simulator") if group.is_main else contextlib.nullcontext()
    with lock:
        if group.is_main:
            # temporaries of a fit killed mid-write (only fit writes these names, under the lock)
            remove_stale_temps(
                run, (CHECKPOINT_NAME, LOG_NAME, SIMULATOR_NAME, FIT_METRICS_NAME)
            )
        simulator.fit(
            classifier, images, run_dir=run, resume=resume, progress=progress, device=device
        )
        if group.is_main:
            simulator.save(run / SIMULATOR_NAME)
        summary = {
            "manifest": str(Path(manifest).resolve()),
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
            "final_step": simulator.history_[-1] if simulator.history_ else {},
        }
        if group.is_main:
            write_json_atomic(run / FIT_METRICS_NAME, summary)
    return summary
