"""Disease progression along the simulator's flow: x o exp(t v) for t in [0, 1].

A velocity-field simulator (``counterwarp fit --field velocity``) predicts a stationary
velocity ``v``; its deformation is ``exp(v)`` (scaling and squaring). Integrating ``t * v``
for ``t`` from 0 to 1 gives a one-parameter family of diffeomorphisms, so the frames
``x o exp(t v)`` show the change "growing" from the input (``t = 0``) to the simulated image
(``t = 1``, exactly what :meth:`Simulator.explain` returns). The matching log volume change
of frame ``t`` is exact in the input's space: ``log det`` of the inverse map ``exp(-t v)``.

Decision for displacement-field simulators (the default ``--field displacement``): their
output ``u`` is not a flow, and ``Id + t u`` is not the path the model defines (it may fold
at intermediate ``t`` even when ``Id + u`` does not). :func:`progression_frames` therefore
raises a :class:`CounterwarpError` telling the user to fit with ``--field velocity``; the
API offers ``linear_displacement=True`` to draw ``x o (Id + t u)`` anyway, labelled as a
linear interpolation (its volume change is the first-order ``-log det(I + t grad u)``).
"""

from __future__ import annotations

import numpy as np
import torch

from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import Simulator
from counterwarp.geometry.volume import log_volume_change
from counterwarp.geometry.warp import integrate_velocity, warp
from counterwarp.nn.simulator import DIRECTIONS

__all__ = [
    "check_progression_supported",
    "progression_frames",
]

MIN_FRAMES = 2
MAX_FRAMES = 200


def check_progression_supported(
    simulator: Simulator, n_frames: int, linear_displacement: bool = False
) -> None:
    """Raise :class:`CounterwarpError` unless ``simulator`` can draw ``n_frames`` frames.

    Call this before writing any output (``explain --progression N``).
    """
    if simulator.net_ is None:
        raise CounterwarpError("the simulator is not fitted: call fit() or load() first")
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or not (
        MIN_FRAMES <= n_frames <= MAX_FRAMES
    ):
        raise CounterwarpError(
            f"--progression {n_frames!r}: give a number of frames from {MIN_FRAMES} to "
            f"{MAX_FRAMES}"
        )
    if simulator.net_.field != "velocity" and not linear_displacement:
        raise CounterwarpError(
            "--progression needs a velocity-field simulator: this one predicts displacements, "
            "which define no path between the image and its simulation. Refit with "
            "`counterwarp fit --field velocity ...`"
        )


@torch.no_grad()
def progression_frames(
    simulator: Simulator,
    image: torch.Tensor,
    direction: str,
    n_frames: int,
    *,
    linear_displacement: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and volume change along the simulator's path, ``t = 0, 1/(N-1), ..., 1``.

    Args:
        simulator: a fitted :class:`Simulator` with ``field="velocity"`` (see the module
            docstring for displacement-field simulators and ``linear_displacement``).
        image: ``(1, 1, *S)`` one preprocessed image (z-scored, model grid).
        direction: ``"inject"`` or ``"remove"``.
        n_frames: N >= 2 frames; the first is the input, the last the simulated image.
        linear_displacement: for displacement-field simulators only: draw ``x o (Id + t u)``.

    Returns:
        ``(frames (N, *S), log_volume_change (N, *S))`` float32 arrays: the warped images
        (same intensity units as ``image``) and the natural-log volume change of the
        anatomy at each frame (growth > 0; 0 at ``t = 0``).
    """
    check_progression_supported(simulator, n_frames, linear_displacement)
    net = simulator.net_
    assert net is not None
    if direction not in DIRECTIONS:
        raise CounterwarpError(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    expected = (1, 1, *net.input_shape)
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != expected:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise CounterwarpError(
            f"progression needs one image of shape {expected}, got {shape}"
        )
    device = next(net.parameters()).device
    net.eval()
    x = image.float().to(device)
    condition = torch.full((1,), DIRECTIONS[direction], device=device)
    raw = net(x, condition)  # (1, d, *S): velocity v, or displacement u
    frames, changes = [], []
    for t in np.linspace(0.0, 1.0, n_frames):
        if t == 0.0:
            frames.append(x[0, 0])
            changes.append(torch.zeros_like(x[0, 0]))
            continue
        if net.field == "velocity":
            displacement = integrate_velocity(float(t) * raw, net.integration_steps)
            inverse = integrate_velocity(-float(t) * raw, net.integration_steps)
            change = log_volume_change(displacement, inverse_displacement=inverse)
        else:
            displacement = float(t) * raw
            change = log_volume_change(displacement)
        frames.append(warp(x, displacement)[0, 0])
        changes.append(change[0])
    return (
        torch.stack(frames).float().cpu().numpy(),
        torch.stack(changes).float().cpu().numpy(),
    )
