"""Memory limits: refuse a grid, an image or a network that cannot fit, before allocating it.

Two limits apply to every image grid counterwarp allocates (a file's declared shape, a
``--shape``, a checkpoint's ``input_shape``):

- a cap of :data:`MAX_VOXELS` voxels per image (2^28 = 268,435,456, i.e. 1 GiB as float32;
  a whole head at 0.5 mm is about 57 million), raised or lowered with the environment
  variable ``COUNTERWARP_MAX_VOXELS``;
- the memory available now: ``MemAvailable`` of ``/proc/meminfo`` (or ``os.sysconf``'s
  available pages), lowered to what a cgroup (container, batch job) still allows. When
  neither can be read, only the cap applies.

A refusal is a :class:`~counterwarp.errors.CounterwarpError` that gives the size in voxels
and GiB and the memory available, and says what to do.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from counterwarp.errors import CounterwarpError

MAX_VOXELS = 2**28
"""Default cap on the voxels of one image grid (override: ``COUNTERWARP_MAX_VOXELS``)."""

_GIB = 1024**3


def max_voxels() -> int:
    """The voxel cap per image: ``COUNTERWARP_MAX_VOXELS`` if set to a positive integer,
    else :data:`MAX_VOXELS`."""
    raw = os.environ.get("COUNTERWARP_MAX_VOXELS", "").strip().replace("_", "")
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return MAX_VOXELS


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemAvailable:"):
                fields = line.split()
                return int(fields[1]) * 1024 if fields[-1].lower() == "kb" else int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_available() -> int | None:
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What a cgroup v2 memory limit still allows (``memory.max - memory.current``)."""
    try:
        limit = (root / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        current = int((root / "memory.current").read_text(encoding="ascii").strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes of memory available to this process now, or None when it cannot be read."""
    system = _meminfo_available()
    if system is None:
        system = _sysconf_available()
    cgroup = _cgroup_available()
    known = [value for value in (system, cgroup) if value is not None]
    return min(known) if known else None


def gib(n_bytes: float) -> str:
    """``n_bytes`` as GiB, e.g. ``"32.0 GiB"`` (three significant digits below 1 GiB)."""
    value = n_bytes / _GIB
    return f"{value:.1f} GiB" if value >= 1 else f"{value:.3g} GiB"


def describe_available() -> str:
    """``"22.1 GiB of memory available"``, or a note that it is unknown."""
    available = available_memory()
    if available is None:
        return "available memory unknown"
    return f"{gib(available)} of memory available"


def check_fits(what: str, n_bytes: int, fix: str, n_voxels: int | None = None) -> None:
    """Refuse a job needing about ``n_bytes`` that exceeds the memory available, or an image
    grid of ``n_voxels`` beyond the voxel cap.

    Args:
        what: the culprit, as the user named it (``"--shape 1000 1000 1000"``, a file,
            ``"classifier input_shape [4096, 4096, 4096]"``).
        n_bytes: the memory the job would need, in bytes.
        fix: what the user should do, one sentence.
        n_voxels: voxels of one image grid, checked against the cap; None: no grid.

    Raises:
        CounterwarpError: over the cap or over the available memory.
    """
    cap = max_voxels()
    available = available_memory()
    over_cap = n_voxels is not None and n_voxels > cap
    if not over_cap and (available is None or n_bytes <= available):
        return
    reason = (
        f"more than counterwarp's limit of {cap:,} voxels per image (COUNTERWARP_MAX_VOXELS; "
        f"{describe_available()})"
        if over_cap
        else f"more than the {describe_available()}"
    )
    size = f"{n_voxels:,} voxels, about " if n_voxels is not None else "about "
    raise CounterwarpError(f"{what}: {size}{gib(n_bytes)} to hold, {reason}. {fix}")


def check_grid(
    shape: Sequence[int], what: str, bytes_per_voxel: int = 12, fix: str | None = None
) -> None:
    """Refuse an image grid ``shape`` too large for the voxel cap or the memory available.

    ``bytes_per_voxel`` is the working memory per voxel (default 12: the float32 image,
    a copy being resampled and the file's own values). Sizes below 1 are left to the
    caller's own validation.
    """
    sizes = [int(n) for n in shape]
    if not sizes or min(sizes) < 1:
        return
    n_voxels = math.prod(sizes)
    check_fits(
        what, n_voxels * bytes_per_voxel,
        fix or "Use a smaller grid (e.g. --shape 64 64 64, or resample the images first).",
        n_voxels=n_voxels,
    )
