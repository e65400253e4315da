"""Displacement fields in world space, as ITK and ANTs read and write them.

The simulator's displacement ``u`` lives on the model grid, in model voxels (channel ``i``
along model axis ``i``), and warps by pull-back: ``y(p) = x(p + u(p))``
(:mod:`counterwarp.geometry.warp`). Outside counterwarp a lab applies warps with ITK, ANTs,
SimpleITK or nitransforms, which expect a *displacement field transform*:

- vectors in millimetres, in ITK's physical space (LPS: ``x`` grows to the left, ``y`` to
  the back, ``z`` up), so a NIfTI file's RAS world vector ``(r, a, s)`` is stored as
  ``(-r, -a, s)``;
- a pull-back as well: resampling ``image`` onto a reference grid with the transform
  computes ``out(w) = image(w + d(w))`` at each reference point ``w`` (world, mm);
- stored as ANTs writes warps: a NIfTI vector image of shape ``(X, Y, Z, 1, 3)`` (2D:
  ``(X, Y, 1, 1, 2)``), intent code 1007 (vector), float32, on the reference grid.

:func:`pull_back_linear` applies such a field the way ITK's ``ResampleImageFilter`` with
linear interpolation does (edge voxels continue for half a voxel, 0 beyond), so the
simulated image counterwarp writes is exactly what ``sitk.Resample(input,
sitk.DisplacementFieldTransform(field))`` gives.
"""

from __future__ import annotations

import numpy as np

from counterwarp.errors import CounterwarpError

#: RAS (NIfTI world) <-> LPS (ITK physical space): the first two axes flip sign.
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
#: NIfTI intent code of a vector-valued image (what ANTs writes for warps).
NIFTI_INTENT_VECTOR = 1007
_SLAB_VOXELS = 1 << 22  # voxels resampled at a time: bounded memory on large grids


def world_displacement(displacement: np.ndarray, model_affine: np.ndarray) -> np.ndarray:
    """Displacement vectors from model voxels to world millimetres (RAS).

    Args:
        displacement: ``(*N, d)`` vectors in model voxels, component ``i`` along model axis
            ``i`` (``d`` in {2, 3}); the positions ``N`` may be any grid.
        model_affine: ``(4, 4)`` voxel-to-world (RAS mm) affine of the model grid.

    Returns:
        ``(*N, 3)`` float64 vectors in RAS mm (``model_affine[:3, :d] @ u``).
    """
    values = np.asarray(displacement, dtype=np.float64)
    d = values.shape[-1]
    if d not in (2, 3):
        raise CounterwarpError(f"displacement vectors must have 2 or 3 components, got {d}")
    linear = np.asarray(model_affine, dtype=np.float64)[:3, :d]
    return values @ linear.T


def ras_to_lps(vectors: np.ndarray) -> np.ndarray:
    """``(*N, k)`` world vectors (k in {2, 3}) flipped between RAS and LPS (its own inverse)."""
    values = np.asarray(vectors, dtype=np.float64)
    return values * RAS_TO_LPS[: values.shape[-1]]


def voxel_offsets(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) vectors ``(*N, 3)`` as offsets in the voxels of a grid with ``affine``.

    Returns ``(*N, d)`` for a ``d``-dimensional grid ``N``: the least-squares solution of
    ``affine[:3, :d] @ offset = world`` (exact unless the vector leaves a 2D grid's plane).
    """
    values = np.asarray(world, dtype=np.float64)
    d = values.ndim - 1
    linear = np.asarray(affine, dtype=np.float64)[:3, :d]
    return values @ np.linalg.pinv(linear).T


def pull_back_linear(image: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``out(q) = image(q + offsets(q))`` with linear interpolation, as ITK resamples.

    Args:
        image: ``(*N)`` intensities on their own grid (``len(N)`` in {2, 3}).
        offsets: ``(*N, d)`` pull-back displacement in the voxels of that grid.

    Returns:
        ``(*N)`` float32: linear interpolation of ``image``; a sample within half a voxel
        outside the grid reads the edge voxel, one further out reads 0 (ITK's
        ``ResampleImageFilter`` with ``LinearInterpolateImageFunction``, default value 0).
    """
    from scipy import ndimage

    values = np.asarray(image, dtype=np.float64)
    shape = values.shape
    steps = np.asarray(offsets, dtype=np.float64)
    if steps.shape != (*shape, len(shape)):
        raise CounterwarpError(
            f"offsets of shape {steps.shape} do not fit an image of shape {shape}"
        )
    out = np.empty(shape, dtype=np.float32)
    rows = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    limits = np.array(shape, dtype=np.float64).reshape(-1, *([1] * len(shape))) - 0.5
    for start in range(0, shape[0], rows):
        stop = min(shape[0], start + rows)
        grid = np.stack(np.meshgrid(np.arange(start, stop), *[np.arange(n) for n in shape[1:]],
                                    indexing="ij")).astype(np.float64)
        points = grid + np.moveaxis(steps[start:stop], -1, 0)  # (d, rows, *N[1:])
        sampled = ndimage.map_coordinates(values, points, order=1, mode="nearest")
        outside = ((points < -0.5) | (points >= limits)).any(axis=0)
        sampled[outside] = 0.0
        out[start:stop] = sampled
    return out


def itk_field_array(lps: np.ndarray, file_dims: int) -> np.ndarray:
    """LPS vectors ``(*N, 3)`` as the float32 array of an ANTs-style warp file.

    Args:
        lps: ``(*N, 3)`` vectors in LPS mm on the reference grid ``N`` (the input's
            spatial axes).
        file_dims: 2 for a 2D grid (ITK reads the ``(X, Y, 1, 1, 2)`` file as a 2D field,
            also where the image itself is stored ``(X, Y, 1)``), 3 for a 3D grid.

    Returns:
        ``(X, Y, Z, 1, file_dims)`` float32 (``Z = 1`` for a 2D grid), the first
        ``file_dims`` components.
    """
    values = np.asarray(lps, dtype=np.float32)[..., :file_dims]
    spatial = tuple(values.shape[:-1]) + (1,) * (3 - (values.ndim - 1))
    return values.reshape(*spatial, 1, file_dims)


def itk_field_image(lps: np.ndarray, affine: np.ndarray, file_dims: int):  # -> Nifti1Image
    """An ANTs-style displacement-field NIfTI image (intent 1007, mm) on ``affine``'s grid.

    Args:
        lps: ``(*N, 3)`` vectors in LPS mm on the reference grid.
        affine: ``(4, 4)`` voxel-to-world affine of the reference grid (the input's).
        file_dims: 2 or 3, see :func:`itk_field_array`.
    """
    import nibabel as nib

    image = nib.Nifti1Image(itk_field_array(lps, file_dims), np.asarray(affine, float))
    image.header.set_intent(NIFTI_INTENT_VECTOR, name="displacement")
    image.header.set_xyzt_units("mm")
    return image
