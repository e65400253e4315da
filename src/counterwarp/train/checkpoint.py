"""The simulator fit's state on disk: its checkpoint, its per-step log, its random state.

A checkpoint (``simulator_checkpoint.pt``, written atomically) holds the model, the
optimisers, the step and every random state, so a resumed run reaches the same weights as an
uninterrupted one; it is loaded with ``weights_only=True``. The log (``simulator_log.csv``)
holds one row of :data:`LOG_COLUMNS` per step; a resumed run keeps the rows up to its step.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from counterwarp import distributed
from counterwarp._io import write_text_atomic
from counterwarp.errors import CounterwarpError
from counterwarp.train.config import FitConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "LOG_COLUMNS",
    "LOG_NAME",
    "load_checkpoint",
    "random_state",
    "read_log",
    "restore_random_state",
    "restore_rank_random_state",
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

