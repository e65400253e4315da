"""Checks of an image file that need no voxel data, run before any voxel is used.

Each refuses with a :class:`~counterwarp.errors.CounterwarpError` naming the file: complex
and RGB / vector data (by name), a voxel-to-world affine with NaN / Inf entries or that is
singular, a declared size beyond :mod:`counterwarp.limits` (voxel cap, memory available),
and a gzip / bzip2 stream that fails its CRC or ends early (nibabel alone stops reading
after the voxels, so it never sees the CRC; here the whole stream is decompressed once per
file and process, in chunks, and thrown away).
"""

from __future__ import annotations

import bz2
import gzip
import zlib
from pathlib import Path

import numpy as np

from counterwarp.errors import CounterwarpError
from counterwarp.limits import check_grid


def check_dtype(image, path: Path) -> None:  # image: nibabel SpatialImage
    dtype = np.dtype(image.get_data_dtype())
    intent = image.header.get("intent_code") if hasattr(image.header, "get") else None
    if dtype.kind == "c":
        raise CounterwarpError(
            f"{path}: the image is complex-valued ({dtype}); counterwarp needs real "
            "intensities. Save its magnitude (numpy.abs) or real part as float32 first."
        )
    if dtype.names is not None or dtype.kind == "V" or _is_vector_intent(intent):
        raise CounterwarpError(
            f"{path}: an RGB/vector image ({dtype}); counterwarp needs one intensity per "
            "voxel. Convert it to a single-channel (grayscale) float32 image first."
        )
    if dtype.kind not in "biuf":
        raise CounterwarpError(
            f"{path}: voxel data type {dtype} is not numeric; save the image as float32."
        )


def _is_vector_intent(intent: object) -> bool:
    """NIfTI intent codes of vector-valued voxels (vector, RGB vector, RGBA vector)."""
    try:
        return int(np.asarray(intent)) in (1007, 2003, 2004)
    except (TypeError, ValueError):
        return False


def check_affine(image, path: Path) -> None:  # image: nibabel SpatialImage
    affine = getattr(image, "affine", None)
    if affine is None:
        return
    matrix = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        raise CounterwarpError(
            f"{path}: the voxel-to-world affine (sform / qform) has NaN or infinite entries, so "
            "no position in mm is defined and no output could be written with it. Fix the "
            "header (e.g. fslorient -copyqform2sform, or nibabel img.set_sform / set_qform)."
        )
    singular = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    if singular[0] == 0 or singular[-1] <= 1e-6 * singular[0]:
        raise CounterwarpError(
            f"{path}: the voxel-to-world affine (sform / qform) is singular (singular values "
            f"{', '.join(f'{v:.3g}' for v in singular)}): it maps the voxels onto a plane or a "
            "point, so no output could be written with it. Fix the header's sform / qform "
            "(voxel sizes must be non-zero)."
        )


def check_size(image, path: Path) -> None:  # image: nibabel SpatialImage
    dtype = np.dtype(image.get_data_dtype())
    shape = tuple(int(n) for n in image.shape)
    check_grid(
        shape,
        f"{path}: the header declares {' x '.join(str(n) for n in shape)} voxels ({dtype})",
        bytes_per_voxel=dtype.itemsize + 8,
        fix="Check the file (a damaged header can declare a wrong size) or crop / resample "
        "the image to a smaller grid first.",
    )


_COMPRESSED = {b"\x1f\x8b": ("gzip", gzip.open), b"BZ": ("bzip2", bz2.open)}
_VERIFIED: set[tuple[str, int, int, int, int]] = set()


def verify_compressed_stream(path: Path) -> None:
    """Decompress a gzip / bzip2 file to its end once (in chunks, nothing kept), so its CRC
    and length are checked; nibabel alone stops after the voxels and never checks them."""
    try:
        stat = path.stat()
        with open(path, "rb") as handle:
            magic = handle.read(2)
    except OSError:
        return  # _open_image has reported unreadable files
    if magic not in _COMPRESSED:
        return
    key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    kind, opener = _COMPRESSED[magic]
    try:
        with opener(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise CounterwarpError(
            f"{path}: the {kind} data are corrupt or truncated ({type(error).__name__}: "
            f"{error}); its voxels cannot be trusted. Re-copy or re-export the file."
        ) from None
    _VERIFIED.add(key)
