"""Stream images one at a time through a DataLoader, and split a cohort into shards.

``counterwarp explain`` and ``counterwarp saliency`` read their inputs through
:func:`stream_images`: a :class:`~torch.utils.data.DataLoader` over :class:`ImageFiles`,
which loads and preprocesses one image per item (:func:`~counterwarp.data.preprocess.
load_model_input`, exactly as the classifier saw its training images). At most
``workers * 2`` images (the loader's prefetch) wait in memory, however long the manifest;
``workers > 0`` reads the next images in background processes while the current one is
explained.

A cluster array job splits a cohort with ``--shard i/n``: shard ``i`` (0-based) takes the
inputs at positions ``i, i + n, i + 2n, ...`` of the full input list (round robin rather
than contiguous blocks, so a manifest sorted by site or diagnosis still gives shards of
similar size and mix). Output ids are made unique over the full list before sharding, so
shards writing into one folder never collide, and their union equals an unsharded run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from counterwarp.data.contract import Preprocessing
from counterwarp.data.preprocess import (
    LoadedVolume,
    _check_shape_argument,
    image_spatial_shape,
    load_model_input,
)
from counterwarp.errors import CounterwarpError

Shard = tuple[int, int]
"""``(index, count)``: shard ``index`` (0-based) of ``count``."""

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_shard(shard: str | Sequence[int] | None) -> Shard | None:
    """``"i/n"`` (or ``(i, n)``) -> ``(i, n)``; None stays None (no sharding).

    Raises:
        CounterwarpError: not two integers ``i/n`` with ``n >= 1`` and ``0 <= i < n``.
    """
    if shard is None:
        return None
    if isinstance(shard, str):
        match = _SHARD.fullmatch(shard)
        if match is None:
            raise CounterwarpError(
                f"--shard {shard!r}: give i/n, the 0-based shard index and the number of "
                f"shards (e.g. --shard 0/4 ... --shard 3/4)"
            )
        index, count = int(match.group(1)), int(match.group(2))
    else:
        values = tuple(shard)
        if len(values) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise CounterwarpError(f"--shard {shard!r}: give two integers (index, count)")
        index, count = values
    if count < 1:
        raise CounterwarpError(f"--shard {index}/{count}: the number of shards must be >= 1")
    if not 0 <= index < count:
        raise CounterwarpError(
            f"--shard {index}/{count}: the shard index is 0-based and must be below {count} "
            f"(0/{count} ... {count - 1}/{count})"
        )
    return index, count


def shard_positions(n_items: int, shard: Shard | None) -> list[int]:
    """Positions (into a list of ``n_items``) that belong to ``shard``: ``i, i+n, i+2n...``."""
    if shard is None:
        return list(range(n_items))
    index, count = shard
    return list(range(index, n_items, count))


def table_name(name: str, shard: Shard | None) -> str:
    """``summary.csv`` unsharded (and for ``0/1``), ``summary.shard-<i>-of-<n>.csv`` sharded."""
    if shard is None or shard[1] == 1:
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.shard-{shard[0]}-of-{shard[1]}{dot}{suffix}"


def check_workers(workers: object) -> int:
    """Refuse a ``--workers`` value that is not an integer >= 0."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise CounterwarpError(
            f"--workers must be an integer >= 0 (0 loads images in the main process), got "
            f"{workers!r}"
        )
    return workers


def check_headers(paths: Sequence[Path], shape: tuple[int, ...]) -> None:
    """Cheap validation before anything is written: every file opens as a 2D / 3D NIfTI
    image (header only) of the model's dimensionality.

    Problems only the voxel data can show (truncated data, NaN, constant images) surface
    when :func:`stream_images` reaches that image.
    """
    for path in paths:
        native = image_spatial_shape(path)
        _check_shape_argument(shape, len(native), Path(path))


class ImageFiles(Dataset):
    """Image files as model inputs, one loaded and preprocessed per item.

    ``dataset[k]`` is ``(k, image (1, *shape) float32 z-scored, LoadedVolume, None)``, or
    ``(k, None, None, message)`` when the file cannot be used; the error travels as data
    so that :func:`stream_images` re-raises it as one clean :class:`CounterwarpError`
    even from a worker process.
    """

    def __init__(
        self, paths: Sequence[Path], shape: tuple[int, ...],
        preprocessing: Preprocessing | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.shape = tuple(shape)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(
        self, index: int
    ) -> tuple[int, torch.Tensor | None, LoadedVolume | None, str | None]:
        try:
            image, volume = load_model_input(self.paths[index], self.shape, self.preprocessing)
        except CounterwarpError as error:
            return index, None, None, str(error)
        return index, image, volume, None


def _as_is(item: Any) -> Any:
    return item


def stream_images(
    paths: Sequence[Path], shape: tuple[int, ...], workers: int = 0,
    preprocessing: Preprocessing | None = None,
) -> Iterator[tuple[int, torch.Tensor, LoadedVolume]]:
    """Yield ``(k, image (1, *shape), LoadedVolume)`` for ``paths[k]``, in order.

    Args:
        paths: image files.
        shape: model grid in voxels.
        workers: background processes reading ahead (0: read in this process).
        preprocessing: the classifier's orientation and intensity normalisation.

    Raises:
        CounterwarpError: the first unusable file, when the stream reaches it.
    """
    loader = DataLoader(
        ImageFiles(paths, shape, preprocessing), batch_size=None, shuffle=False,
        num_workers=check_workers(workers), collate_fn=_as_is,
    )
    for index, image, volume, error in loader:
        if error is not None:
            raise CounterwarpError(error)
        assert image is not None and volume is not None
        yield index, image, volume


def stopped_early(error: CounterwarpError, done: int, out: Path, table: str) -> CounterwarpError:
    """``error`` from the image stream, saying what was written before it came (if any)."""
    if not done:
        return error
    return CounterwarpError(
        f"{error} (the outputs of the {done} image(s) before it are in {out}; {table} was "
        f"not written)"
    )
