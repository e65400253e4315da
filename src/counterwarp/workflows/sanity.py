"""``counterwarp sanity``: the checks that say whether an explanation explains the classifier.

On the held-out images of a run (real data works: no truth is needed):

1. **Cascading model-parameter randomisation** (Adebayo et al. 2018): the classifier's
   blocks are re-initialised from the output backwards (:mod:`counterwarp.explain.
   randomisation`). Every saliency method's maps of each stage are compared with its maps
   of the trained classifier (Spearman rank correlation of ``|map|`` per image, and the
   Pearson of the mean ``|map|``); the simulator is **refitted** against the randomised
   classifier of chosen stages (it learns from the classifier, so only a refit can tell)
   and its "inject" maps compared, signed, with the run's. Each randomised classifier is
   scored too (held-out AUROC, logit correlation with the trained one): a random read-out
   of trained features can still tell the groups apart, and a faithful map of such a
   classifier should agree with the original. By default the simulator is refitted at
   stage 1 and at the first stage whose classifier no longer tells the groups apart.
2. **Seed control**: the simulator refitted for the *trained* classifier with another seed;
   the agreement of its maps with the run's is the seed-to-seed agreement, the level a
   randomised classifier's agreement must fall well below.
3. **Oracle** (:mod:`counterwarp.workflows.oracle`): an independent, smaller classifier trained
   on the run's training images; the simulated images must move it the same way.
4. Optionally **another run** (``compare_run``, e.g. a classifier trained on a cohort with
   a different effect, same grid): the agreement of its simulator's group map with this
   run's, which should be low when the effects differ.

Writes ``sanity.json``, ``sanity.md``, ``sanity_randomisation.csv`` and
``randomisation.png`` into ``out``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from counterwarp._io import json_safe, write_json_atomic, write_text_atomic, writing_folder
from counterwarp._io.provenance import PROVENANCE_NAME, record, relative_to
from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import explain_in_batches
from counterwarp.explain.randomisation import (
    map_agreement,
    randomisation_stages,
    randomised_copy,
)
from counterwarp.explain.saliency import saliency_map
from counterwarp.explain.simulator import Simulator

__all__ = [
    "RANDOMISATION_COLUMNS",
    "parse_refit_stages",
    "sanity_run",
    "what_is_left",
]

RANDOMISATION_COLUMNS = (
    "stage", "blocks", "method", "n_images", "agreement_spearman", "agreement_group_pearson",
    "moved_share",
)


def _saliency_maps(classifier: torch.nn.Module, images: torch.Tensor, methods: list[str],
                   occlusion_patch: int) -> dict[str, np.ndarray]:
    """method -> (N, *S) saliency maps of ``images`` (N, 1, *S)."""
    from counterwarp.nn.classifier import last_conv_layer

    maps = {}
    for method in methods:
        layer = last_conv_layer(classifier) if method == "gradcam" else None
        maps[method] = np.concatenate([
            saliency_map(classifier, images[i : i + 4], method, target_layer=layer,
                         occlusion_patch=occlusion_patch).detach().cpu().numpy()
            for i in range(0, len(images), 4)
        ])
    return maps


def _agreement(original: np.ndarray, other: np.ndarray, brains: np.ndarray,
               healthy: np.ndarray, absolute: bool) -> tuple[float, float]:
    """(mean per-image Spearman, Pearson of the group maps over healthy images)."""
    per_image = [map_agreement(a, b, m, absolute)["spearman"]
                 for a, b, m in zip(original, other, brains, strict=True)]
    where = healthy if healthy.any() else np.ones(len(original), bool)
    group_a = (np.abs(original) if absolute else original)[where].mean(0)
    group_b = (np.abs(other) if absolute else other)[where].mean(0)
    brain = brains.mean(0) >= 0.5
    return (float(np.nanmean(per_image)),
            map_agreement(group_a, group_b, brain, absolute=False)["pearson"])


def _refit(simulator: Simulator, classifier: torch.nn.Module, train_images: torch.Tensor,
           steps: int | None, seed: int, progress: bool) -> Simulator:
    settings = simulator.config.to_dict()
    settings["seed"] = seed
    if steps is not None:
        settings["steps"] = steps
    refit = Simulator(**settings)
    return refit.fit(classifier, train_images, progress=progress)


def sanity_run(
    run: str | Path, out: str | Path, *, manifest: str | Path | None = None,
    split: str = "test", methods: str | list[str] | None = None, max_images: int = 16,
    simulator_stages: int | str = "auto", simulator_steps: int | None = None,
    seed_control: bool = True,
    oracle: bool = True, oracle_epochs: int = 20, compare_run: str | Path | None = None,
    occlusion_patch: int = 4, seed: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Run the sanity checks of the module docstring on a fitted run; returns sanity.json.

    Args:
        run: run folder with a classifier (with modules) and a fitted simulator.
        out: output folder.
        manifest: images (default: the manifest of ``RUN/split.json``).
        split: the part of the split explained (held-out ``test`` by default).
        methods: saliency methods (comma-separated or a list; default all hookable).
        max_images: at most this many held-out images (healthy and diseased alternating).
        simulator_stages: the cascading stages that get a simulator refit (each one fit):
            ``"auto"`` (stage 1 and the first stage whose randomised classifier no longer
            tells the groups apart), an integer K (stages 1 to K), or stage numbers
            ``"1,3"``.
        simulator_steps: steps of each refit (default: the run's own).
        seed_control: also refit for the trained classifier with another seed.
        oracle: train and query the independent oracle classifier.
        oracle_epochs: its training epochs.
        compare_run: another run on the same grid whose simulator's maps to compare.
        seed: seed of the randomisation, the refits (``seed + 1``) and the oracle.
    """
    from counterwarp.workflows.benchmark import _chosen_methods
    from counterwarp.workflows.folder import (
        load_images,
        load_run_simulator,
        model_preprocessing,
        model_shape,
        read_split,
        rows_in_split,
    )
    from counterwarp.workflows.saliency import hookable_methods

    run, out = Path(run).expanduser(), Path(out).expanduser()
    if max_images < 2:
        raise CounterwarpError(f"--max-images must be at least 2, got {max_images}")
    simulator, payload = load_run_simulator(run)
    classifier = simulator.classifier_
    assert classifier is not None
    stages = randomisation_stages(classifier)
    refit_stages = parse_refit_stages(simulator_stages, len(stages))
    chosen = hookable_methods(_chosen_methods(methods), payload, progress)
    manifest = Path(manifest) if manifest else Path(read_split(run).get("manifest") or "")
    if not manifest.name:
        raise CounterwarpError(f"{run}/split.json names no manifest; pass --manifest M")
    positive = payload.get("positive_label")
    rows = rows_in_split(run, manifest, split, positive_label=positive)
    rows = _alternate(rows, max_images)
    shape, prep = model_shape(payload), model_preprocessing(payload)
    images, labels = load_images(rows, shape, progress=False, preprocessing=prep)
    train_rows = rows_in_split(run, manifest, "train+val", positive_label=positive)
    needs_training = refit_stages != set() or seed_control or oracle
    train_images, train_labels = (load_images(train_rows, shape, progress=False,
                                              preprocessing=prep)
                                  if needs_training else (images, labels))
    other = load_run_simulator(Path(compare_run).expanduser())[0] if compare_run else None
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder")
    with writing_folder(out, "sanity checks", hint="move it away, or choose another --out"):
        result = _checks(simulator, images, labels, train_images, train_labels, stages,
                         chosen, refit_stages, simulator_steps, seed_control, oracle,
                         oracle_epochs, other, occlusion_patch, seed, progress)
        result.update({"run": str(run), "split": split, "n_images": len(rows),
                       "ids": [Path(r.path).name for r in rows],
                       "compare_run": str(compare_run) if compare_run else None})
        _write(out, result)
        write_json_atomic(out / PROVENANCE_NAME, record(
            run=relative_to(run, out), seed=seed, methods=chosen))
    return result


def what_is_left(randomised: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  trained_logits: np.ndarray) -> dict[str, float]:
    """What a randomised classifier still does on the held-out images.

    Randomising the last block need not destroy what the classifier reads: a random
    read-out of the trained features can still rank the images as the trained classifier
    does. Then a faithful explanation *should* agree with the original one, and the
    randomisation check cannot tell a faithful method from one that ignores the model.

    Returns:
        ``auroc``: of the randomised logits against the labels (0.5: no group signal
        left; near 0 or 1: the groups are still told apart, either way round);
        ``logit_pearson``: the Pearson of its logits with the trained classifier's over
        the images (near 1: it still ranks them the same way).
    """
    from counterwarp.nn.classifier import predict_in_batches
    from counterwarp.train.common import auc

    logits = predict_in_batches(randomised, images).numpy()
    spread = float(np.std(logits)) * float(np.std(trained_logits))
    return {"auroc": auc(logits, labels.numpy()),
            "logit_pearson": (float(np.corrcoef(logits, trained_logits)[0, 1])
                              if spread > 0 else float("nan"))}


def parse_refit_stages(value: int | str, n_stages: int) -> set[int] | None:
    """The stages of ``--simulator-stages``; None for ``"auto"`` (decided once the
    randomised classifiers are scored).

    Raises:
        CounterwarpError: not ``auto``, a count 0..n or stage numbers 1..n.
    """
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        if "," not in text:
            count = int(text)
            if not 0 <= count <= n_stages:
                raise ValueError
            return set(range(1, count + 1))
        chosen = {int(part) for part in text.split(",") if part.strip()}
        if not chosen or not all(1 <= k <= n_stages for k in chosen):
            raise ValueError
        return chosen
    except ValueError:
        raise CounterwarpError(
            f"--simulator-stages {value!r}: give 'auto', a count from 0 to {n_stages}, or "
            f"stage numbers from 1 to {n_stages} such as '1,3'") from None


def _alternate(rows: list[Any], count: int) -> list[Any]:
    """Up to ``count`` rows, diseased and healthy alternating."""
    pools = [[r for r in rows if int(r.label) == 1], [r for r in rows if int(r.label) != 1]]
    chosen: list[Any] = []
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop(0))
    return chosen


def _checks(simulator: Simulator, images: torch.Tensor, labels: torch.Tensor,
            train_images: torch.Tensor, train_labels: torch.Tensor, stages: list[Any],
            methods: list[str], refit_stages: set[int] | None, simulator_steps: int | None,
            seed_control: bool, oracle: bool, oracle_epochs: int, other: Simulator | None,
            occlusion_patch: int, seed: int, progress: bool) -> dict[str, Any]:
    classifier = simulator.classifier_
    assert classifier is not None
    brains = images[:, 0].numpy() != 0
    healthy = labels.numpy() == 0
    original_sim = explain_in_batches(simulator, images, "inject").log_volume_change.numpy()
    original_saliency = _saliency_maps(classifier, images, methods, occlusion_patch)
    rows: list[dict[str, Any]] = []
    from counterwarp.nn.classifier import predict_in_batches

    trained_logits = predict_in_batches(classifier, images).numpy()
    randomised_models = [randomised_copy(classifier, stage, seed + index)
                         for index, stage in enumerate(stages, start=1)]
    classifiers = [{"stage": index, "blocks": stage.name,
                    **what_is_left(model, images, labels, trained_logits)}
                   for index, (stage, model) in enumerate(zip(stages, randomised_models,
                                                              strict=True), start=1)]
    if refit_stages is None:
        from counterwarp.workflows.sanity_report import first_stage_without_group_signal

        informative = first_stage_without_group_signal(classifiers)
        refit_stages = {1} | ({informative} if informative is not None else set())
    for index, (stage, randomised) in enumerate(
            tqdm(list(zip(stages, randomised_models, strict=True)),
                 desc="sanity: randomisation stages", disable=not progress), start=1):
        maps = _saliency_maps(randomised, images, methods, occlusion_patch)
        for method in methods:
            spearman, group = _agreement(original_saliency[method], maps[method], brains,
                                         healthy, absolute=True)
            rows.append({"stage": index, "blocks": stage.name, "method": method,
                         "n_images": len(images), "agreement_spearman": spearman,
                         "agreement_group_pearson": group, "moved_share": None})
        if index in refit_stages:
            refit = _refit(simulator, randomised, train_images, simulator_steps, seed + 1,
                           progress)
            explained = explain_in_batches(refit, images, "inject")
            spearman, group = _agreement(original_sim, explained.log_volume_change.numpy(),
                                         brains, healthy, absolute=False)
            rows.append({"stage": index, "blocks": stage.name, "method": "simulator_inject",
                         "n_images": len(images), "agreement_spearman": spearman,
                         "agreement_group_pearson": group,
                         "moved_share": float(explained.moved.float().mean())})
    result: dict[str, Any] = {"randomisation": rows, "randomised_classifiers": classifiers,
                              "methods": methods,
                              "stages": [s.name for s in stages],
                              "simulator_stages": sorted(refit_stages),
                              "simulator_steps": simulator_steps or simulator.config.steps}
    if seed_control:
        refit = _refit(simulator, classifier, train_images, simulator_steps, seed + 1,
                       progress)
        explained = explain_in_batches(refit, images, "inject")
        spearman, group = _agreement(original_sim, explained.log_volume_change.numpy(),
                                     brains, healthy, absolute=False)
        result["seed_control"] = {"seed": seed + 1, "agreement_spearman": spearman,
                                  "agreement_group_pearson": group,
                                  "moved_share": float(explained.moved.float().mean())}
    if oracle:
        from counterwarp.workflows.oracle import oracle_agreement, train_oracle

        model = train_oracle(train_images, train_labels, epochs=oracle_epochs, seed=seed + 1,
                             progress=progress)
        result["oracle"] = oracle_agreement(model, simulator, images, labels, train_images)
    if other is not None:
        theirs = explain_in_batches(other, images, "inject").log_volume_change.numpy()
        spearman, group = _agreement(original_sim, theirs, brains, healthy, absolute=False)
        result["compare_run_agreement"] = {"agreement_spearman": spearman,
                                           "agreement_group_pearson": group}
    return result


def _write(out: Path, result: dict[str, Any]) -> None:
    from counterwarp.workflows.sanity_report import randomisation_figure, sanity_markdown

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RANDOMISATION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in result["randomisation"]:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(out / "sanity_randomisation.csv", buffer.getvalue())
    write_text_atomic(out / "sanity.md", sanity_markdown(result))
    randomisation_figure(result, out / "randomisation.png")
    result["outputs"] = ["sanity.json", "sanity.md", "sanity_randomisation.csv",
                         "randomisation.png"]
    write_json_atomic(out / "sanity.json", json_safe(result))

