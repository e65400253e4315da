"""What a classifier still reads once its blocks are randomised (cascading, output first).

The cascading randomisation check (``counterwarp sanity``) expects an explanation of a
randomised classifier to differ from the original. That holds only if randomising removed
what the classifier reads. For every stage this prints, on the run's held-out images:

- the randomised classifier's group means and sds of the logit, its held-out AUROC and the
  Pearson of its logits with the trained classifier's;
- for a ``counterwarp synth`` cohort, its logit shift when the cohort's *true* effect is
  applied, per region (``counterwarp.explain.sensitivity``): a randomised classifier that
  still reads the ventricles the same way should still be explained by ventricle growth.

Usage (a run fitted on a synth cohort)::

    python benchmarks/randomised_classifier.py --run RUN --data COHORT [--stages 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from counterwarp.explain.randomisation import randomisation_stages, randomised_copy
from counterwarp.explain.sensitivity import classifier_region_sensitivity
from counterwarp.nn.classifier import predict_in_batches
from counterwarp.workflows.folder import (
    load_images,
    load_run_simulator,
    model_preprocessing,
    model_shape,
    read_split,
    rows_in_split,
)
from counterwarp.workflows.sanity import what_is_left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="fitted run folder")
    parser.add_argument("--data", type=Path, required=True, help="its synth cohort folder")
    parser.add_argument("--stages", type=int, default=None,
                        help="probe the regions for the first N stages (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the sanity seed (stage k is randomised with seed + k)")
    args = parser.parse_args()
    simulator, payload = load_run_simulator(args.run)
    classifier = simulator.classifier_
    assert classifier is not None
    rows = rows_in_split(args.run, Path(read_split(args.run)["manifest"]), "test",
                         positive_label=payload.get("positive_label"))
    images, labels = load_images(rows, model_shape(payload), progress=False,
                                 preprocessing=model_preprocessing(payload))
    trained = predict_in_batches(classifier, images).numpy()
    stages = randomisation_stages(classifier)
    models = [("trained", classifier)] + [
        (stage.name, randomised_copy(classifier, stage, args.seed + k))
        for k, stage in enumerate(stages, start=1)]
    for k, (name, model) in enumerate(models):
        logits = predict_in_batches(model, images)
        healthy, diseased = logits[labels == 0], logits[labels == 1]
        left = what_is_left(model, images, labels, trained)
        print(f"== stage {k} ({name}): logit healthy {healthy.mean():.3f} "
              f"(sd {healthy.std():.3f}), diseased {diseased.mean():.3f} "
              f"(sd {diseased.std():.3f}); AUROC {left['auroc']:.3f}, "
              f"logits r {left['logit_pearson']:.3f} with the trained")
        if args.stages is not None and k > args.stages:
            continue
        for row in classifier_region_sensitivity(model, images, labels, args.data) or []:
            print(f"   {row['region']:<52s} inject {row['inject_logit_shift']:+.3f}  "
                  f"remove {row['remove_logit_shift']:+.3f}")


if __name__ == "__main__":
    main()
