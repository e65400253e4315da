"""The simulator fit's state on disk: its checkpoint, its per-step log, its random state.

A checkpoint (``simulator_checkpoint.pt``, written atomically) holds the model, the
optimisers, the step and every random state, so a resumed run reaches the same weights as an
uninterrupted one; it is loaded with ``weights_only=True``. The log (``simulator_log.csv``)
holds one row of :data:`LOG_COLUMNS` per step; a resumed run keeps the rows up to its step.

While a fit runs, both live in the run's hidden ``.fit-staging`` folder and replace the
run's own only when the fit completes (:mod:`counterwarp.train.staging`); a killed or failed
fit's progress is therefore in ``RUN/.fit-staging``, where ``fit --resume`` looks first.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from counterwarp import distributed
from counterwarp._io import write_text_atomic
from counterwarp.errors import CounterwarpError
from counterwarp.train.config import FitConfig
from counterwarp.train.staging import FIT_STAGING

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "LOG_COLUMNS",
    "LOG_NAME",
    "load_checkpoint",
    "random_state",
    "read_log",
    "restore_checkpoint",
    "restore_random_state",
    "restore_rank_random_state",
    "resume_source",
    "setting_differences",
    "write_log",
]

CHECKPOINT_NAME = "simulator_checkpoint.pt"
LOG_NAME = "simulator_log.csv"
LOG_COLUMNS = (
    "step", "loss", "shift", "cycle", "smooth", "magnitude", "moved_share", "lr", "seconds",
)
#: The ``format`` entry of every simulator checkpoint.
CHECKPOINT_FORMAT = "counterwarp.simulator"


def random_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """torch's global random state and the batch sampler's, for a checkpoint."""
    return {"torch": torch.get_rng_state(), "sampler": generator.get_state()}


def restore_random_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Set torch's global random state and the sampler's from :func:`random_state`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])


def restore_rank_random_state(
    state: dict[str, Any], group: distributed.ProcessGroup, config: FitConfig, step: int
) -> None:
    """Each rank's own torch random state from a checkpoint of a distributed run.

    A checkpoint written by another number of processes has no state for this rank: the
    rank then gets a fresh stream (the run continues correctly, though not bit-exactly as
    an uninterrupted one would).
    """
    by_rank = state.get("torch_by_rank")
    if isinstance(by_rank, list) and len(by_rank) == group.world_size:
        torch.set_rng_state(by_rank[group.rank])
    else:
        group.seed_per_rank(config.seed + step)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a simulator checkpoint with ``weights_only=True`` (never unpickles code)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CounterwarpError(f"{path}: no such checkpoint") from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CounterwarpError(
            f"{path}: not a loadable counterwarp checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); delete it or re-run "
            f"without --resume"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CounterwarpError(f"{path}: not a counterwarp simulator checkpoint")
    return payload


def read_log(path: Path, up_to_step: int) -> list[dict[str, float]]:
    """The rows of the log at ``path`` up to ``up_to_step`` (none when it is missing)."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [
            {k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)
            if int(float(row["step"])) <= up_to_step
        ]
    return rows


def write_log(path: Path, rows: list[dict[str, float]]) -> None:
    """Write ``rows`` (dicts with every key of :data:`LOG_COLUMNS`) as the log, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row[k]) for k in LOG_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def resume_source(run_dir: str | Path) -> Path | None:
    """The checkpoint a resumed fit in ``run_dir`` continues from, or None.

    An interrupted fit's staged checkpoint (``RUN/.fit-staging/simulator_checkpoint.pt``:
    where a killed, failed or stopped fit keeps its progress) when there is one, else the
    run's own ``simulator_checkpoint.pt`` (the last completed fit).
    """
    run_dir = Path(run_dir)
    for path in (run_dir / FIT_STAGING / CHECKPOINT_NAME, run_dir / CHECKPOINT_NAME):
        if path.is_file():
            return path
    return None


def setting_differences(saved: FitConfig, wanted: FitConfig) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved value, wanted value)}`` for every setting that differs."""
    old, new = saved.to_dict(), wanted.to_dict()
    return {name: (old.get(name), value) for name, value in new.items()
            if old.get(name) != value}


def restore_checkpoint(
    source: Path, config: FitConfig, bindings: dict[str, str], net: nn.Module,
    main_opt: torch.optim.Optimizer, cycle_opt: torch.optim.Optimizer | None,
    sampler: torch.Generator, group: distributed.ProcessGroup,
) -> tuple[int, list[dict[str, float]]]:
    """Load the checkpoint ``source`` into the fit's state; return its step and log rows.

    Refused: other settings (each named, old -> new), another classifier (a ``bindings``
    entry the checkpoint records with another value), a step past ``config.steps``, damage.
    A larger ``steps`` extends the fit when the learning rate is constant; with the cosine
    schedule the rate of every step depends on ``steps``, so changing it is refused.
    """
    state = load_checkpoint(source)
    if not isinstance(state.get("fit_config"), dict):
        raise CounterwarpError(
            f"{source}: damaged checkpoint (no settings); delete it or start a new run folder"
        )
    try:
        saved = FitConfig.from_dict(state["fit_config"])
    except (CounterwarpError, TypeError, ValueError) as error:
        raise CounterwarpError(
            f"{source}: damaged settings ({error}); delete it or start a new run folder"
        ) from None
    for key, value in bindings.items():
        recorded = state.get(key)
        if recorded is not None and recorded != value:
            raise CounterwarpError(
                f"{source} was written for another classifier (retrained since: its "
                f"{key} differs); rerun the fit without --resume to start afresh for the "
                f"current classifier"
            )
    changes = setting_differences(saved, config)
    if "steps" in changes and config.lr_schedule == "constant":
        changes.pop("steps")  # extends (or continues) a constant-rate fit exactly
    if changes:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
        cosine = (" (the cosine learning-rate schedule depends on the number of steps, so "
                  "a fit with it cannot be extended)" if "steps" in changes else "")
        raise CounterwarpError(
            f"{source} was written with other settings: {listed}{cosine}; resume with the "
            f"same settings, or rerun without --resume to fit afresh"
        )
    start_step = state.get("step")
    if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
        raise CounterwarpError(
            f"{source}: step {start_step!r} is not a step count; delete the checkpoint or "
            f"start a new run folder"
        )
    if start_step > config.steps:
        raise CounterwarpError(
            f"{source}: step {start_step} is not within 0..{config.steps} (--steps "
            f"{config.steps}): a fit can be extended with a larger --steps, not shortened; "
            f"rerun without --resume"
        )
    try:
        net.load_state_dict(state["state_dict"])
        main_opt.load_state_dict(state["optimizer"])
        if cycle_opt is not None:
            cycle_opt.load_state_dict(state["cycle_optimizer"])
        restore_random_state(state["random_state"], sampler)
        if group.distributed:
            restore_rank_random_state(state["random_state"], group, config, start_step)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        message = " ".join(str(error).split())[:200]
        raise CounterwarpError(
            f"{source}: damaged checkpoint ({type(error).__name__}: {message}); delete it or "
            f"start a new run folder"
        ) from None
    return start_step, read_log(source.parent / LOG_NAME, start_step)
