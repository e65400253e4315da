"""Run-folder workflow behind ``counterwarp saliency``: classic saliency maps per image.

For every image (the ``split`` part of a manifest, or image files given directly) and every
requested method of :data:`~counterwarp.explain.saliency.SALIENCY_METHODS`, the map of the
run's classifier logit is computed on the model grid, restored (linearly) to the image's own
grid and written as ``OUT/<id>_<method>.nii.gz`` with the image's affine, so it overlays on
the input in any viewer. One PNG per image, ``OUT/<id>_saliency.png``, shows all requested
methods side by side (on the model grid, over the z-scored image the classifier saw), and
``OUT/saliency_index.csv`` lists what was written.

Images are read one at a time through a DataLoader (``workers`` background processes read
ahead), and ``shard="i/n"`` maps only inputs ``i, i+n, i+2n, ...`` and writes
``OUT/saliency_index.shard-<i>-of-<n>.csv`` instead, so the shards of an array job can share
``OUT`` (see :mod:`counterwarp.data.stream`).

Everything that can be checked cheaply is checked before the first file is written: the
method names, the occlusion patch, the shard and workers, the classifier checkpoint, the
split and every input image's header. Such a user error leaves ``OUT`` untouched (not even
created); an image whose voxel data turn out unusable (truncated, NaN, constant) stops the
run when the stream reaches it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from counterwarp._io import shard_tag, write_json_atomic, write_text_atomic, writing_folder
from counterwarp._io.provenance import PROVENANCE_NAME, input_digests, record, relative_to
from counterwarp.data.preprocess import save_on_input_grid
from counterwarp.data.stream import (
    Shard,
    check_workers,
    parse_shard,
    stopped_early,
    stream_images,
    table_name,
)
from counterwarp.errors import CounterwarpError
from counterwarp.explain.saliency import SALIENCY_METHODS, saliency_map
from counterwarp.nn.classifier import last_conv_layer
from counterwarp.report.figures import saliency_panel
from counterwarp.train.common import choose_device
from counterwarp.workflows.classifier import ClassifierSource, used_classifier_digest
from counterwarp.workflows.explain import FOREIGN_HINT, explain_inputs, shard_inputs
from counterwarp.workflows.folder import SALIENCY_INDEX_NAME as INDEX_NAME
from counterwarp.workflows.folder import load_run_classifier, model_preprocessing, model_shape

INDEX_COLUMNS = ("id", "path", "label", "method", "file", "panel")

__all__ = ["INDEX_COLUMNS", "INDEX_NAME", "parse_methods", "saliency_run"]


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Validate saliency method names; ``"a,b"`` or ``["a", "b"]``; ``"all"`` = every method.

    Names are stripped and lower-cased; duplicates are dropped (first occurrence kept).

    Returns:
        the method names in the order given (``SALIENCY_METHODS`` order for ``all``).

    Raises:
        CounterwarpError: no name, or a name that is not a saliency method (the message
            lists the valid ones).
    """
    if isinstance(methods, str):
        names = methods.split(",")
    elif isinstance(methods, Sequence):
        names = [part for item in methods for part in str(item).split(",")]
    else:
        raise CounterwarpError(
            f"--method must be a name or a list of names, got {type(methods).__name__}"
        )
    names = [name.strip().lower() for name in names if name.strip()]
    valid = ", ".join(SALIENCY_METHODS)
    if not names:
        raise CounterwarpError(f"--method: give at least one of: {valid} (or 'all')")
    if "all" in names:
        return list(SALIENCY_METHODS)
    unknown = [name for name in names if name not in SALIENCY_METHODS]
    if unknown:
        raise CounterwarpError(
            f"--method: unknown saliency method(s) {', '.join(map(repr, unknown))}; "
            f"choose from: {valid} (comma-separated), or 'all'"
        )
    return list(dict.fromkeys(names))


#: Methods that hook the model's modules (a TorchScript / torch.export model has none).
HOOK_METHODS = ("guided_backprop", "gradcam")


def _compiled_kind(payload: dict[str, Any]) -> str | None:
    kind = (payload.get("classifier") or {}).get("kind")
    return {"torchscript": "TorchScript", "export": "torch.export"}.get(kind)


def check_hooks_supported(methods: list[str], payload: dict[str, Any]) -> None:
    """Refuse guided backprop and Grad-CAM for a compiled (TorchScript / export) model."""
    kind, hooked = _compiled_kind(payload), [m for m in methods if m in HOOK_METHODS]
    if kind and hooked:
        raise CounterwarpError(
            f"--method {','.join(hooked)} needs the model's modules, which a {kind} "
            "classifier does not expose; use gradient, integrated_gradients, smoothgrad, "
            "gradient_x_input or occlusion, or give the model as module:factory --weights"
        )


def hookable_methods(methods: list[str], payload: dict[str, Any], say: bool) -> list[str]:
    """``methods`` without guided backprop and Grad-CAM for a compiled model (said once)."""
    kind = _compiled_kind(payload)
    if not kind:
        return methods
    left_out = [m for m in methods if m in HOOK_METHODS]
    if left_out and say:
        print(f"note: {', '.join(left_out)} left out: a {kind} classifier has no modules to "
              "hook", flush=True)
    return [m for m in methods if m not in HOOK_METHODS]


def check_occlusion_patch(methods: list[str], patch: object, shape: tuple[int, ...]) -> None:
    """Refuse an occlusion patch that is not an integer in 1..min(shape) (model voxels)."""
    if "occlusion" not in methods:
        return
    if isinstance(patch, bool) or not isinstance(patch, int) or not 1 <= patch <= min(shape):
        raise CounterwarpError(
            f"--occlusion-patch must be an integer between 1 and {min(shape)} (the smallest "
            f"side of the model grid {shape}), got {patch!r}"
        )


def saliency_run(
    run: str | Path,
    out: str | Path,
    *,
    methods: str | Sequence[str],
    manifest: str | Path | None = None,
    split: str = "test",
    images: Sequence[str | Path] | None = None,
    occlusion_patch: int = 4,
    progress: bool = True,
    device: str | None = None,
    shard: str | Shard | None = None,
    workers: int = 0,
    classifier: ClassifierSource | None = None,
) -> list[dict[str, Any]]:
    """Saliency maps of the run's classifier for each image, written as NIfTI and PNG.

    Args:
        run: run folder holding ``classifier.pt`` (and ``split.json`` when ``manifest`` is
            given).
        out: output folder (created once every input has been validated).
        methods: method names, comma-separated string or list; ``"all"`` = every method in
            :data:`SALIENCY_METHODS`. Grad-CAM uses the classifier's last convolution.
        manifest: CSV of images; its rows in the ``split`` part(s) of ``RUN/split.json``
            are explained (a manifest of another cohort is used whole).
        split: ``train``, ``val``, ``test``, joined with ``+``, or ``all``.
        images: NIfTI files to explain instead of a manifest.
        occlusion_patch: occlusion patch edge in model-grid voxels (1 .. smallest model size).
        progress: show a progress bar (stderr).
        device: torch device; None = CUDA when available, else CPU.
        shard: ``"i/n"``: only inputs ``i, i+n, i+2n, ...`` (0-based); the index is then
            ``saliency_index.shard-<i>-of-<n>.csv``. None (or ``"0/1"``): every input.
        workers: background processes reading the next images (0: the main process).

    Writes:
        ``OUT/<id>_<method>.nii.gz``: float32 map on the input's grid, with its affine
        (units: see :mod:`counterwarp.explain.saliency`; model-grid values, not rescaled);
        ``OUT/<id>_saliency.png``: one panel per image with all methods;
        ``OUT/saliency_index.csv`` (sharded: ``saliency_index.shard-<i>-of-<n>.csv``): the
        returned rows.

    Returns:
        one row per image and method: ``id``, ``path`` (input file, absolute), ``label``
        (manifest label, ``""`` for image files), ``method``, ``file`` (the NIfTI map,
        absolute), ``panel`` (the image's PNG, absolute).

    Raises:
        CounterwarpError: unknown method, bad occlusion patch, missing / bad classifier or
            split, manifest and images both or neither given, bad shard or workers,
            unreadable input image, or ``out`` being an existing file. Nothing is written
            in these cases, except for an image whose voxel data prove unusable after
            earlier images were mapped. Also: another process writing ``out`` (the same
            shard, or unsharded), or a file in ``out`` with an output's name that no
            counterwarp command created there.

    A failure while writing (a full disk) removes what this call wrote and restores what it
    replaced; the error names the file being written.
    """
    run, out = Path(run).expanduser(), Path(out).expanduser()
    chosen = parse_methods(methods)
    shard = parse_shard(shard)
    check_workers(workers)
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder; choose a folder path")
    with writing_folder(out, "saliency maps", tag=shard_tag(shard), hint=FOREIGN_HINT) as held:
        return _saliency_into(
            held, run, out, chosen, manifest=manifest, split=split, images=images,
            occlusion_patch=occlusion_patch, progress=progress, device=device, shard=shard,
            workers=workers, classifier=classifier,
        )


def _saliency_into(
    transaction: Any, run: Path, out: Path, chosen: list[str], *,
    manifest: str | Path | None, split: str, images: Sequence[str | Path] | None,
    occlusion_patch: int, progress: bool, device: str | None, shard: Shard | None,
    workers: int, classifier: ClassifierSource | None = None,
) -> list[dict[str, Any]]:
    """The body of :func:`saliency_run`, run while holding ``out``'s lock and transaction."""
    model, payload = load_run_classifier(run, source=classifier)
    check_hooks_supported(chosen, payload)
    shape = model_shape(payload)
    check_occlusion_patch(chosen, occlusion_patch, shape)
    inputs = explain_inputs(
        run, manifest, split, list(images) if images else None, payload.get("positive_label")
    )
    mine, ids = shard_inputs(inputs, shard, shape)
    table = table_name(INDEX_NAME, shard)
    torch_device = choose_device(device)
    model.to(torch_device)
    target_layer = last_conv_layer(model) if "gradcam" in chosen else None

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(mine) * len(chosen), desc="saliency", disable=not progress)
    stream = stream_images([item.path for item in mine], shape, workers,
                           model_preprocessing(payload))
    done = 0
    try:
        while True:
            try:
                k, tensor, volume = next(stream)
            except StopIteration:
                break
            except CounterwarpError as error:
                bar.leave = False  # no half-drawn bar above the one-line error
                bar.close()
                if done:
                    transaction.keep()  # the finished images' maps stay, as the message says
                raise stopped_early(error, done, out, table) from None
            out.mkdir(parents=True, exist_ok=True)  # once the first image has loaded
            item, id_ = mine[k], ids[k]
            batch = tensor.unsqueeze(0).to(torch_device)  # (1, 1, *S) z-scored, model grid
            maps = {}
            for method in chosen:
                bar.set_postfix_str(f"{id_} {method}", refresh=False)
                attribution = saliency_map(
                    model, batch, method, target_layer=target_layer, occlusion_patch=occlusion_patch
                )
                maps[method] = attribution[0].cpu().numpy()  # (*S) float32, model grid
                bar.update()
            panel = out / f"{id_}_saliency.png"
            for method, values in maps.items():
                file = out / f"{id_}_{method}.nii.gz"
                save_on_input_grid(file, values, volume)
                rows.append(
                    {
                        "id": id_,
                        "path": str(item.path),
                        "label": "" if item.label is None else item.label,
                        "method": method,
                        "file": file.name,
                        "panel": panel.name,
                    }
                )
            saliency_panel(tensor[0].numpy(), maps, panel, title=f"{id_}: saliency of the logit",
                           affine=volume.model_affine)
            done += 1
    except BaseException:
        bar.leave = False  # the error's line must not be glued onto the bar's
        bar.close()
        raise
    bar.close()
    write_index_csv(out / table, rows)
    write_json_atomic(out / table_name(PROVENANCE_NAME, shard), record(
        run=relative_to(run, out), classifier_sha256=used_classifier_digest(run, classifier),
        methods=list(chosen), inputs_sha256=input_digests([item.path for item in mine], out),
    ))
    return rows


def write_index_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the saliency index (:data:`INDEX_COLUMNS`, one line per row) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())
