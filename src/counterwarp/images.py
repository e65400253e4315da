"""The image API, in nilearn's style: images in (file paths or nibabel images), nibabel
images out, each on the input's own grid with the input's affine.

The command line and :mod:`counterwarp.workflows` work on folders; this works on one image
at a time, for a notebook::

    from counterwarp.images import Explainer

    explainer = Explainer("runs/demo/run")            # a run folder with a fitted simulator
    result = explainer.explain("sub-01_T1w.nii.gz", direction="inject")
    result.log_jacobian.to_filename("sub-01_desc-inject_logjac.nii.gz")
    nilearn.plotting.plot_stat_map(result.log_jacobian, bg_img="sub-01_T1w.nii.gz")
    explainer.score(result.simulated)                  # the classifier on the warped image
    explainer.saliency("sub-01_T1w.nii.gz", method="gradient")

An image is prepared exactly as the run's classifier expects (its orientation, model grid
and intensity normalisation); the outputs are those ``counterwarp explain`` writes
(:func:`counterwarp.workflows.explain.input_grid_maps`): the simulated image at the input's
intensities, the log volume change (growth > 0, 0 outside the brain) and the ITK / ANTs
displacement field (LPS mm).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from counterwarp.data.preprocess import LoadedVolume, load_model_input, restore_to_input
from counterwarp.errors import CounterwarpError
from counterwarp.explain.saliency import SALIENCY_METHODS, saliency_map
from counterwarp.nn.classifier import last_conv_layer
from counterwarp.workflows.explain import input_grid_maps
from counterwarp.workflows.folder import load_run_simulator, model_preprocessing, model_shape

__all__ = ["Explainer", "ImageExplanation"]

#: What an image argument may be: a NIfTI path or an in-memory nibabel image.
ImageLike = str | os.PathLike[str] | nib.spatialimages.SpatialImage


@dataclass
class ImageExplanation:
    """One image explained in one direction; the images are on the input's grid.

    Attributes:
        direction: ``"inject"`` (more diseased) or ``"remove"`` (healthier).
        simulated: the input warped, at its own intensities (float32, the input's shape).
        log_jacobian: log volume change of the anatomy (natural log, growth > 0), 0 outside
            the brain (float32, the input's shape).
        displacement: the pull-back displacement as an ITK / ANTs warp (LPS mm, intent
            vector, ``(X, Y, Z, 1, 3)``).
        score_before, score_after: the classifier's explained score (logit, class log-odds
            or regression value) of the input and of the simulated image on the model grid.
        moved: whether the score moved past the simulator's margin in ``direction``.
        folding_share: share of model-grid voxels where the deformation folds (det <= 0).
    """

    direction: str
    simulated: nib.Nifti1Image
    log_jacobian: nib.Nifti1Image
    displacement: nib.Nifti1Image
    score_before: float
    score_after: float
    moved: bool
    folding_share: float


@contextmanager
def _as_file(image: ImageLike) -> Iterator[Path]:
    """A path to ``image``: its own for a path, a temporary NIfTI for an in-memory image
    (removed afterwards), so one loader checks every image the same way."""
    if isinstance(image, (str, os.PathLike)):
        yield Path(image)
        return
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise CounterwarpError(
            f"expected a NIfTI path or a nibabel image, got {type(image).__name__}"
        )
    with tempfile.TemporaryDirectory(prefix="counterwarp-image-") as folder:
        path = Path(folder) / "image.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header),
                 str(path))
        yield path


class Explainer:
    """The fitted simulator and classifier of a run folder, applied to single images.

    Args:
        run: a run folder holding ``simulator.pt`` (``counterwarp fit``) and its classifier.
    """

    def __init__(self, run: str | os.PathLike[str]) -> None:
        self.run = Path(run)
        self.simulator, self.payload = load_run_simulator(self.run)
        self.shape = model_shape(self.payload)
        self.preprocessing = model_preprocessing(self.payload)

    @contextmanager
    def _loaded(self, image: ImageLike) -> Iterator[tuple[torch.Tensor, LoadedVolume]]:
        """``((1, 1, *S) model input, LoadedVolume)`` of ``image``, while its file exists."""
        with _as_file(image) as path:
            tensor, volume = load_model_input(path, self.shape, self.preprocessing)
            yield tensor.unsqueeze(0), volume

    def score(self, image: ImageLike) -> float:
        """The classifier's explained score of ``image`` (a logit for counterwarp's own)."""
        classifier = self.simulator.classifier_
        with self._loaded(image) as (batch, _), torch.no_grad():
            return float(classifier(batch).reshape(-1)[0])

    def explain(self, image: ImageLike, direction: str = "inject") -> ImageExplanation:
        """Simulate ``direction`` on ``image``; the maps on the input's grid."""
        with self._loaded(image) as (batch, volume):
            explanation = self.simulator.explain(batch, direction)
            maps = input_grid_maps(volume, explanation.displacement[0].numpy(),
                                   explanation.log_volume_change[0].numpy())
        return ImageExplanation(
            direction=direction, simulated=maps.simulated, log_jacobian=maps.log_volume_change,
            displacement=maps.field, score_before=float(explanation.logit_before[0]),
            score_after=float(explanation.logit_after[0]), moved=bool(explanation.moved[0]),
            folding_share=float(explanation.folding[0]),
        )

    def saliency(self, image: ImageLike, method: str = "gradient", **options: Any
                 ) -> nib.Nifti1Image:
        """A saliency map of the classifier's score (one of
        :data:`~counterwarp.explain.saliency.SALIENCY_METHODS`) on the input's grid."""
        if method not in SALIENCY_METHODS:
            raise CounterwarpError(
                f"method {method!r} is not one of {', '.join(SALIENCY_METHODS)}"
            )
        classifier = self.simulator.classifier_
        layer = last_conv_layer(classifier) if method == "gradcam" else None
        with self._loaded(image) as (batch, volume):
            values = saliency_map(classifier, batch, method, target_layer=layer, **options)
            restored = restore_to_input(values[0].detach().cpu().numpy(), volume)
            return nib.Nifti1Image(restored.astype(np.float32), volume.affine)
