"""How accurate and how fast is ``counterwarp prepare`` on a real individual brain?

Colin27 (Debian ``mricron-data``: ``ch2.nii.gz`` with skull, ``ch2bet.nii.gz`` stripped,
1 mm, already close to MNI space) is made "native-looking" per seed: moved by a known
random rigid + scale transform (rotations +-10 deg, scales 1 +- 0.08, shifts +-10 mm),
stored with other axis codes (PIR, LAS, RSA ...), 1 x 1 x 1.2 mm voxels and the field of
view cut 20 mm at the bottom (:func:`counterwarp.prepare.simulate.native_like`). Then

- **registration error**, mean and max over the MNI152 brain voxels (mm), of the written
  transform against the truth ``M @ R0``: ``M`` the known transform, ``R0`` the same
  registration of the unmoved ``ch2bet`` (so the error is what the native storage and the
  motion add; ``R0`` against the identity is printed too: how far Colin27 lies from
  MNI152 2009 in an affine sense). Two runs: ``skull_strip="none"`` on the moved ``ch2bet``
  (registration alone) and ``"deepbet"`` on the moved ``ch2`` (end to end);
- **skull-strip Dice** of deepbet's native mask against the moved ``ch2bet`` mask;
- **seconds per subject**, skull strip and registration separately (from prepare.json).

With ``--ants-python PY`` (a Python with antspyx, kept OUT of the project's venv: antspyx
pins older numpy / scipy) ANTs' ``Affine`` registration (antspyx defaults) of the same
stripped scans is measured too, in a subprocess, against ``M @ R0_ants`` (ANTs' own
registration of the unmoved ch2bet), and its ``R0`` against SimpleITK's.

Usage::

    .venv/bin/python benchmarks/prepare_colin27.py --seeds 0 1 2 [--ants-python PY]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from counterwarp.prepare import load_template, read_transform, register_affine
from counterwarp.prepare.register import transform_matrix_ras
from counterwarp.prepare.simulate import brain_points, native_like, registration_error
from counterwarp.prepare.skullstrip import dice
from counterwarp.workflows.prepare import PREPARE_JSON, SUFFIXES, prepare_scans

TEMPLATES = Path("/usr/share/mricron/templates")
CODES = ("PIR", "LAS", "RSA", "ASL", "IPL")
_ANTS = """
import sys, ants
fixed, moving, prefix = sys.argv[1:4]
import time; t = time.perf_counter()
out = ants.registration(ants.image_read(fixed), ants.image_read(moving), "Affine",
                        outprefix=prefix)
print(out["fwdtransforms"][0], time.perf_counter() - t)
"""


def _native(seed: int, crop_mm: float) -> dict:
    head = nib.load(TEMPLATES / "ch2.nii.gz")
    stripped = nib.load(TEMPLATES / "ch2bet.nii.gz")
    mask = nib.Nifti1Image((np.asarray(stripped.dataobj) > 0).astype(np.uint8), stripped.affine)
    options = {"codes": CODES[seed % len(CODES)], "voxel_size": (1.0, 1.0, 1.2),
               "crop_mm": crop_mm}
    moved = native_like(head, seed, **options)
    return {
        "matrix": moved.matrix, "head": moved.image, "codes": options["codes"],
        "brain": native_like(stripped, seed, matrix=moved.matrix,
                             **options).image,
        "mask": native_like(mask, seed, matrix=moved.matrix, order=0, **options).image,
    }


def _ants(python: str, fixed: Path, moving: Path, work: Path) -> tuple[np.ndarray, float]:
    """ANTs Affine registration in a subprocess: ``(MNI -> native RAS matrix, seconds)``."""
    done = subprocess.run([python, "-c", _ANTS, str(fixed), str(moving), str(work / "ants_")],
                          check=True, capture_output=True, text=True)
    path, seconds = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return transform_matrix_ras(read_transform(path)), float(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--crop-mm", type=float, default=20.0)
    parser.add_argument("--ants-python", default=None, help="a Python with antspyx")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if not (TEMPLATES / "ch2.nii.gz").is_file():
        print(f"Colin27 not found in {TEMPLATES}: apt-get install mricron-data", file=sys.stderr)
        return 2
    template = load_template()
    points = brain_points(template.mask)
    stripped = nib.load(TEMPLATES / "ch2bet.nii.gz")
    started = time.perf_counter()
    reference = transform_matrix_ras(register_affine(stripped, template).transform)
    r0_seconds = time.perf_counter() - started
    r0_mean, r0_max = registration_error(reference, np.eye(4), points)
    print(f"R0 (ch2bet -> MNI152 2009) vs identity: mean {r0_mean:.2f} mm, max {r0_max:.2f} "
          f"mm ({r0_seconds:.1f} s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nib.save(template.brain, work / "mni_brain.nii.gz")
        if args.ants_python:
            ants_reference, seconds = _ants(args.ants_python, work / "mni_brain.nii.gz",
                                            TEMPLATES / "ch2bet.nii.gz", work)
            agree = registration_error(ants_reference, reference, points)
            print(f"R0 by ANTs vs R0 by SimpleITK: mean {agree[0]:.2f} mm, max {agree[1]:.2f} "
                  f"mm; ANTs R0 vs identity: mean "
                  f"{registration_error(ants_reference, np.eye(4), points)[0]:.2f} mm "
                  f"({seconds:.1f} s)")
        for seed in args.seeds:
            scan = _native(seed, args.crop_mm)
            truth = scan["matrix"] @ reference
            row = {"seed": seed, "codes": scan["codes"], "shape": list(scan["head"].shape)}
            for kind, image, strip in (("none", scan["brain"], "none"),
                                       ("deepbet", scan["head"], "deepbet")):
                folder = work / f"in-{seed}-{kind}"
                folder.mkdir()
                nib.save(image, folder / "colin.nii.gz")
                out = work / f"out-{seed}-{kind}"
                prepare_scans(folder, out, skull_strip=strip, progress=False)
                estimated = transform_matrix_ras(
                    read_transform(out / f"colin{SUFFIXES['transform']}"))
                mean, largest = registration_error(estimated, truth, points)
                record = json.loads((out / PREPARE_JSON).read_text())["scans"][0]
                row[kind] = {"error_mean_mm": mean, "error_max_mm": largest,
                             "seconds": record["seconds"]}
                if kind == "deepbet":
                    mask = np.asarray(nib.load(out / f"colin{SUFFIXES['mask']}").dataobj) > 0
                    row[kind]["dice_vs_ch2bet"] = dice(mask, np.asarray(scan["mask"].dataobj))
            if args.ants_python:
                ants_matrix, seconds = _ants(args.ants_python, work / "mni_brain.nii.gz",
                                             folder.parent / f"in-{seed}-none" /
                                             "colin.nii.gz", work)
                mean, largest = registration_error(
                    ants_matrix, scan["matrix"] @ ants_reference, points)
                row["ants"] = {"error_mean_mm": mean, "error_max_mm": largest,
                               "seconds": seconds}
            rows.append(row)
            _print_row(row)
    _summary(rows)
    if args.json:
        args.json.write_text(json.dumps({"r0_vs_identity_mm": [r0_mean, r0_max],
                                         "rows": rows}, indent=2) + "\n")
    return 0


def _print_row(row: dict) -> None:
    none, deep = row["none"], row["deepbet"]
    text = (f"seed {row['seed']} ({row['codes']}, {row['shape']}): registration alone "
            f"{none['error_mean_mm']:.2f} / {none['error_max_mm']:.2f} mm "
            f"({none['seconds']['register']:.1f} s); end to end {deep['error_mean_mm']:.2f} / "
            f"{deep['error_max_mm']:.2f} mm, deepbet Dice {deep['dice_vs_ch2bet']:.3f} "
            f"(strip {deep['seconds']['skull_strip']:.1f} s, register "
            f"{deep['seconds']['register']:.1f} s, total {deep['seconds']['total']:.1f} s)")
    if "ants" in row:
        ants = row["ants"]
        text += (f"; ANTs Affine {ants['error_mean_mm']:.2f} / {ants['error_max_mm']:.2f} mm "
                 f"({ants['seconds']:.1f} s)")
    print(text, flush=True)


def _summary(rows: list[dict]) -> None:
    def mean(kind: str, key: str, sub: str | None = None) -> float:
        values = [r[kind][key][sub] if sub else r[kind][key] for r in rows if kind in r]
        return float(np.mean(values)) if values else float("nan")

    print(f"over {len(rows)} seeds: registration alone mean {mean('none', 'error_mean_mm'):.2f}"
          f" mm (worst max {max(r['none']['error_max_mm'] for r in rows):.2f} mm), "
          f"{mean('none', 'seconds', 'register'):.1f} s; end to end mean "
          f"{mean('deepbet', 'error_mean_mm'):.2f} mm (worst max "
          f"{max(r['deepbet']['error_max_mm'] for r in rows):.2f} mm); deepbet Dice "
          f"{mean('deepbet', 'dice_vs_ch2bet'):.3f}, strip "
          f"{mean('deepbet', 'seconds', 'skull_strip'):.1f} s, register "
          f"{mean('deepbet', 'seconds', 'register'):.1f} s per subject")
    if any("ants" in r for r in rows):
        print(f"ANTs Affine: mean {mean('ants', 'error_mean_mm'):.2f} mm (worst max "
              f"{max(r['ants']['error_max_mm'] for r in rows):.2f} mm), "
              f"{mean('ants', 'seconds'):.1f} s per subject")


if __name__ == "__main__":
    sys.exit(main())
