"""The commands behind the parser: each maps its arguments onto one workflow and prints
where it wrote what."""

from __future__ import annotations

import argparse
from pathlib import Path


def _shape(values: list[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)


def _cmd_synth(args: argparse.Namespace) -> None:
    from counterwarp.data.synthetic import synth

    manifest = synth(
        args.out,
        n=args.n,
        shape=_shape(args.shape),
        dim=args.dim,
        diseased_fraction=args.diseased_fraction,
        effect=args.effect,
        seed=args.seed,
        effect_spec=args.effect_spec,
        overwrite=args.overwrite,
        anatomy=args.anatomy,
    )
    print(f"cohort written to {Path(args.out)}  (manifest: {manifest})")


def _cmd_train_classifier(args: argparse.Namespace) -> None:
    from counterwarp.distributed import is_main
    from counterwarp.train.classifier import train_classifier

    metrics = train_classifier(
        args.manifest,
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        shape=_shape(args.shape),
        positive_label=args.positive_label,
        negative_labels=args.negative_labels,
        overwrite=args.overwrite,
    )
    if not is_main():  # under torchrun, rank 0 reports
        return
    test = metrics["test"]
    print(
        f"classifier test metrics: accuracy {test['accuracy']:.3f}, balanced accuracy "
        f"{test['balanced_accuracy']:.3f}, AUC {test['auc']:.3f} (n={test['n']})"
    )
    print(f"wrote {Path(args.out) / 'classifier.pt'}, classifier_metrics.json, split.json")


def _fit_settings(args: argparse.Namespace) -> dict:
    """The ``fit`` options given on the command line, as FitConfig settings."""
    from counterwarp.train.config import SETTING_HELP

    return {
        name: getattr(args, name) for name in SETTING_HELP if getattr(args, name) is not None
    }


def _classifier(args: argparse.Namespace):  # -> ClassifierSource | None
    """The ``--classifier SPEC --weights --contract`` of a command, checked (or None)."""
    from counterwarp.errors import CounterwarpError
    from counterwarp.workflows.classifier import classifier_source

    if args.classifier is None:
        given = [flag for flag, value in (("--weights", args.weights),
                                          ("--contract", args.contract)) if value is not None]
        if given:
            raise CounterwarpError(f"{' and '.join(given)} without --classifier SPEC; name the "
                                   "classifier they belong to")
        return None
    return classifier_source(args.classifier, args.weights, args.contract)


def _cmd_fit(args: argparse.Namespace) -> None:
    from counterwarp.distributed import is_main
    from counterwarp.workflows.fit import fit_run

    summary = fit_run(
        args.manifest, args.run, split=args.split, resume=args.resume, device=args.device,
        classifier=_classifier(args), **_fit_settings(args),
    )
    if not is_main():  # under torchrun, rank 0 reports
        return
    final = summary["final_step"]
    unit = f" {summary['unit']}" if summary.get("unit") else ""
    print(
        f"simulator fitted on {summary['n_images']} images; margin {summary['margin']:.3f}"
        f"{unit} ({summary['margin_rule']}); last step: moved share "
        f"{final.get('moved_share', 0):.2f}"
    )
    print(f"wrote {Path(args.run) / 'simulator.pt'}, simulator_fit.json, simulator_log.csv")
    if args.ensemble > 1:
        args.members, args.out, args.steps = args.ensemble, None, None
        args.atlas = args.atlas_names = None
        _cmd_ensemble(args)


def _cmd_ensemble(args: argparse.Namespace) -> None:
    from counterwarp.workflows.ensemble import ensemble_run

    result = ensemble_run(args.run, args.out, members=args.members, manifest=args.manifest,
                          steps=args.steps, atlas=args.atlas, atlas_names=args.atlas_names)
    for direction, part in result["directions"].items():
        print(f"ensemble {direction}: {result['members']} seeds, seed-to-seed agreement "
              f"{part['agreement_mean']:.3f} (min {part['agreement_min']:.3f})")
    out = args.out or Path(args.run) / "ensemble"
    print(f"wrote ensemble_<direction>_{{mean,spread}}.nii.gz, ensemble.md to {out}")


def _cmd_explain(args: argparse.Namespace) -> None:
    from counterwarp.data.stream import parse_shard, table_name
    from counterwarp.workflows.explain import explain_run
    from counterwarp.workflows.folder import EXPLAIN_SUMMARY_NAME

    rows = explain_run(
        args.run, args.out, manifest=args.manifest, split=args.split, images=args.images,
        direction=args.direction, progression=args.progression, shard=args.shard,
        workers=args.workers, classifier=_classifier(args), native=args.native,
    )
    moved = sum(bool(r["moved_by_margin"]) for r in rows)
    table = table_name(EXPLAIN_SUMMARY_NAME, parse_shard(args.shard))
    print(f"explained {len(rows)} image-direction pairs; {moved} moved past the margin")
    print(f"wrote NIfTI maps, PNG panels and {table} to {Path(args.out)}")


def _cmd_saliency(args: argparse.Namespace) -> None:
    from counterwarp.data.stream import parse_shard, table_name
    from counterwarp.workflows.saliency import INDEX_NAME, saliency_run

    rows = saliency_run(
        args.run, args.out, methods=args.method, manifest=args.manifest, split=args.split,
        images=args.images, occlusion_patch=args.occlusion_patch, device=args.device,
        shard=args.shard, workers=args.workers, classifier=_classifier(args),
    )
    n_images = len({r["id"] for r in rows})
    n_methods = len({r["method"] for r in rows})
    table = table_name(INDEX_NAME, parse_shard(args.shard))
    print(f"saliency: {n_images} images x {n_methods} methods")
    print(f"wrote <id>_<method>.nii.gz maps, <id>_saliency.png panels and {table} "
          f"to {Path(args.out)}")


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from counterwarp.workflows.benchmark import run_benchmark

    result = run_benchmark(
        args.data, args.run, args.out, methods=args.methods,
        occlusion_patch=args.occlusion_patch, threshold=args.threshold, sigma=args.sigma,
        device=args.device, seed=args.seed, classifier=_classifier(args),
    )
    print(f"benchmark: {result['n_test']} held-out subjects ({result['n_test_diseased']} "
          f"diseased) x {len(result['methods'])} methods")
    print(f"wrote results.csv, results.json, results.md, methods_figure.png to {Path(args.out)}")
    if args.sanity:
        args.out = Path(args.out) / "sanity"
        args.manifest = Path(args.data) / "manifest.csv"
        args.saliency = args.methods
        _cmd_sanity(args)


def _cmd_sanity(args: argparse.Namespace) -> None:
    from counterwarp.workflows.sanity import sanity_run

    result = sanity_run(
        args.run, args.out, manifest=args.manifest, methods=args.saliency,
        max_images=args.max_images, simulator_stages=args.simulator_stages,
        simulator_steps=args.simulator_steps, seed_control=not args.no_seed_control,
        oracle=not args.no_oracle, oracle_epochs=args.oracle_epochs,
        compare_run=args.compare_run, seed=args.seed,
    )
    from counterwarp.workflows.sanity_report import first_stage_without_group_signal

    informative = first_stage_without_group_signal(result["randomised_classifiers"])
    for row in result["randomisation"]:
        if row["stage"] in (1, informative):
            where = ("last block randomised" if row["stage"] == 1 else
                     f"stage {row['stage']} (no group signal left)")
            print(f"sanity: {where}, {row['method']}: agreement "
                  f"{row['agreement_spearman']:.3f} (per image), "
                  f"{row['agreement_group_pearson']:.3f} (group)")
    print(f"wrote sanity.md, sanity.json, sanity_randomisation.csv, randomisation.png "
          f"to {Path(args.out)}")


def _cmd_group(args: argparse.Namespace) -> None:
    from counterwarp.workflows.group import group_run

    directions = ("inject", "remove") if args.direction == "both" else (args.direction,)
    for direction in directions:
        summary = group_run(
            args.run, args.out, direction=direction, maps_dir=args.maps,
            manifest=args.manifest, split=args.split, subset=args.subjects, atlas=args.atlas,
            atlas_names=args.atlas_names, mask=args.mask, q=args.q,
            valid_only=not args.all_explanations, permutations=args.permutations,
            seed=args.seed,
        )
        left_out = (f" ({summary['n_invalid']} invalid explanations left out)"
                    if summary.get("n_invalid") and not summary.get("invalid_included") else "")
        fwe = summary.get("permutation") or {}
        tested = (f"; {fwe['n_fwe_voxels_tfce']} survive FWE p<{fwe['alpha']:g} (TFCE), "
                  f"{fwe['n_fwe_voxels_t']} (max-t)" if fwe.get("tested") else "")
        print(f"group {direction}: {summary['n_subjects']} {summary['subjects']} subjects"
              f"{left_out} in {summary['space']}; {summary['n_fdr_voxels']} of "
              f"{summary['n_brain_voxels']} voxels survive FDR q={summary['q']:g}{tested}")
    print(f"wrote group_<direction>_{{mean,t,p,fdr_mask}}.nii.gz, PNGs, README to {args.out}")


def _cmd_report(args: argparse.Namespace) -> None:
    from counterwarp.workflows.report import report_run

    path = report_run(
        args.run, args.out, explain_dir=args.explain, saliency_dir=args.saliency,
        benchmark=args.benchmark, n_subjects=args.subjects, compute=not args.no_compute,
        progress=True, classifier=_classifier(args),
    )
    print(f"wrote {path}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from counterwarp.workflows.prepare import prepare_scans

    shape = _shape(args.shape)
    if shape is None and args.voxel_size is None:
        shape = (32, 32, 32)
    result = prepare_scans(args.input, args.out, skull_strip=args.skull_strip, shape=shape,
                           voxel_size=args.voxel_size, label_column=args.label_column)
    print(f"prepared {len(result['scans'])} scans into {Path(args.out)}  "
          f"(manifest: {result['manifest']}; QC figures: *_desc-registration_T1w.png)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from counterwarp.workflows.demo import run_demo

    run_demo(args.out, quick=args.quick)


