"""When one explanation counts: the classifier moved past the margin and nothing folded.

An explanation of one image in one direction is **valid** when

- the classifier's logit moved past the simulator's margin in the asked direction (up for
  ``inject``, down for ``remove``): otherwise the warp did not do what it claims to explain;
- the deformation folds nowhere (``det(I + grad u) > 0`` at every voxel): a folding warp
  is not a change of anatomy, and its volume-change map is not a volume change.

Every table, panel, group map and report carries this judgement: invalid explanations
are drawn marked as such and left out of group maps, with the counts stated.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "FOLDING_TOLERANCE",
    "GROUP_SUBJECTS",
    "invalid_reason",
    "valid_explanations",
]

#: Largest share of folding voxels a valid explanation may have (none).
FOLDING_TOLERANCE = 0.0

#: The subjects whose explanation answers each direction's question: "inject" asks what
#: would make a healthy brain look diseased, "remove" what would make a diseased one look
#: healthy. Label 0 = healthy, 1 = diseased.
GROUP_SUBJECTS = {"inject": "healthy", "remove": "diseased"}


def valid_explanations(
    moved: torch.Tensor | np.ndarray, folding: torch.Tensor | np.ndarray
) -> np.ndarray:
    """``(B,)`` bool: moved past the margin and no folding voxel.

    Args:
        moved: ``(B,)`` bool, the logit moved past the margin in the asked direction.
        folding: ``(B,)`` share of voxels (0..1) where ``det(I + grad u) <= 0``.
    """
    moved = np.asarray(moved.cpu() if isinstance(moved, torch.Tensor) else moved, bool)
    folding = np.asarray(
        folding.cpu() if isinstance(folding, torch.Tensor) else folding, np.float64
    )
    return moved & (folding <= FOLDING_TOLERANCE)


def invalid_reason(moved: bool, folding: float) -> str:
    """Why one explanation is not valid, in words ("" when it is valid)."""
    reasons = []
    if not moved:
        reasons.append("the logit did not move past the margin")
    if folding > FOLDING_TOLERANCE:
        reasons.append(f"the deformation folds in {folding:.2%} of voxels")
    return "; ".join(reasons)
