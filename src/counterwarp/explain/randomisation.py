"""Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for
saliency maps"): an explanation of a classifier whose weights were destroyed must differ
from the explanation of the trained one.

The classifier's parametrised blocks are randomised from the output backwards, one more
block per stage (stage 1: the last block; stage K: every block), each re-initialised by
its own ``reset_parameters`` under a fixed seed. An explanation method that passes gives
maps that agree less and less with the original as more of the model is randomised; one
whose maps stay the same explains the image, not the classifier.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from counterwarp.errors import CounterwarpError
from counterwarp.stats.scores import pearson, spearman

__all__ = [
    "RandomisationStage",
    "map_agreement",
    "randomisation_stages",
    "randomised_copy",
]


@dataclass(frozen=True)
class RandomisationStage:
    """One cascading stage: the blocks randomised so far, last block first.

    Attributes:
        name: e.g. ``"head"`` or ``"head + features.3"``.
        blocks: the module names (``model.named_modules()`` keys) randomised at this stage.
    """

    name: str
    blocks: tuple[str, ...]


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _blocks(model: nn.Module) -> list[str]:
    """Names of the model's parametrised blocks, input side first.

    Top-level children; an ``nn.Sequential`` child of conv blocks (``features``) counts
    each of its children as a block, so the paper's CNN has ``features.0`` ...
    ``features.3`` and ``head``.
    """
    names = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and all(
            isinstance(c, nn.Sequential) for c in child.children()
        ):
            names += [f"{name}.{sub}" for sub, grand in child.named_children()
                      if _has_parameters(grand)]
        elif _has_parameters(child):
            names.append(name)
    return names


def randomisation_stages(model: nn.Module) -> list[RandomisationStage]:
    """The cascading stages of ``model``, from its last block (stage 1) to all of them.

    Raises:
        CounterwarpError: the model has no parametrised sub-modules to randomise (a
            TorchScript or torch.export classifier, or a single layer).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise CounterwarpError(
            "cascading randomisation needs the classifier's modules; a TorchScript model "
            "has none to re-initialise: give it as package.module:factory with --weights"
        )
    blocks = _blocks(model)
    if len(blocks) < 1:
        raise CounterwarpError(
            f"the classifier ({type(model).__name__}) has no parametrised blocks to randomise"
        )
    stages = []
    for k in range(1, len(blocks) + 1):
        chosen = tuple(reversed(blocks[-k:]))
        stages.append(RandomisationStage(" + ".join(chosen), chosen))
    return stages


def randomised_copy(model: nn.Module, stage: RandomisationStage, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with the stage's blocks re-initialised (eval mode, frozen).

    Every sub-module of a randomised block that has ``reset_parameters`` (convolutions,
    linear layers, normalisation layers, whose running statistics are reset too) gets a
    fresh initialisation drawn under ``seed``; the caller's random state is kept.
    """
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in stage.blocks:
            if name not in modules:
                raise CounterwarpError(f"the classifier has no block {name!r} to randomise")
            for sub in modules[name].modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()
                running = getattr(sub, "reset_running_stats", None)
                if callable(running):
                    running()
    copied.eval()
    for parameter in copied.parameters():
        parameter.requires_grad_(False)
    return copied


def map_agreement(
    original: np.ndarray, other: np.ndarray, mask: np.ndarray, absolute: bool
) -> dict[str, float]:
    """How alike two maps are inside ``mask``: Pearson and Spearman rank correlation.

    Args:
        original, other: ``(*S)`` maps (any unit).
        mask: ``(*S)`` bool, the voxels compared (brain).
        absolute: compare ``|map|`` (saliency: where, not which way; as Adebayo et al.).

    Returns:
        ``{"pearson": r, "spearman": rho}``; nan when a map is constant in the mask.
    """
    a, b = np.asarray(original, np.float64), np.asarray(other, np.float64)
    if absolute:
        a, b = np.abs(a), np.abs(b)
    mask = np.asarray(mask, bool)
    return {"pearson": pearson(a, b, mask), "spearman": spearman(a, b, mask)}
