"""Property-based tests (hypothesis): the manifest parser, output ids and the volume change.

- Any valid manifest, written with any of the accepted separators, a byte-order mark or
  not, CRLF or LF, blank lines, extra columns in any order and header case, relative paths
  with spaces and non-ASCII names, reads back row for row: path, label, subject, extras and
  line number.
- Output ids made from arbitrary file names stay plain, visible file names inside ``--out``,
  and are unique for any list of inputs.
- ``log_volume_change`` of an affine field ``u(p) = A p + b`` is ``-log det(I + A)``
  everywhere; uniform scaling by ``s`` gives ``-d log s`` (shrinks where ``s > 1``); volume
  changes of composed warps add (exactly for affine fields, to second order for small ones).
"""

from __future__ import annotations

import csv
import io
import math
import re
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings

from counterwarp.data.derivatives import derivative_id, output_name
from counterwarp.data.manifest import image_id, read_manifest
from counterwarp.geometry.volume import log_volume_change
from counterwarp.workflows.explain import ExplainInput, unique_ids

FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- manifests

NAME = st.text(
    alphabet=st.characters(categories=("Lu", "Ll", "Nd"), include_characters=" -_.()+éüßø"),
    min_size=1, max_size=12,
).filter(lambda name: name == name.strip())
VALUE = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=12
).map(str.strip)
LABEL_SPELLINGS = {0: ["0", "0.0", " 0", "0 "], 1: ["1", "1.0", " 1 ", "1.00"]}
EXTRA_COLUMNS = ["age", "site", "Scanner", "x1", "notes"]


@st.composite
def manifests(draw: st.DrawFn) -> dict:
    """A valid manifest: its rows, how it is spelled, and what reading it must return."""
    n = draw(st.integers(2, 7))
    stems = draw(st.lists(NAME, min_size=n, max_size=n, unique_by=str.casefold))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)
                  .filter(lambda values: len(set(values)) == 2))
    rows = []
    for stem, label in zip(stems, labels, strict=True):
        folder = draw(st.sampled_from(["", "imgs", "a b", "ü/ä ö"]))
        suffix = draw(st.sampled_from([".nii.gz", ".nii", ".NII.GZ"]))
        rows.append({
            "relative": f"{folder}/{stem}{suffix}" if folder else f"{stem}{suffix}",
            "stem": stem,
            "label": label,
            "label_text": draw(st.sampled_from(LABEL_SPELLINGS[label])),
            "subject": draw(st.one_of(st.just(""), NAME)),
        })
    extras = draw(st.lists(st.sampled_from(EXTRA_COLUMNS), unique=True, max_size=3))
    for row in rows:
        row["extras"] = {name: draw(VALUE) for name in extras}
    with_subject = draw(st.booleans())
    columns = ["path", "label", *(["subject"] if with_subject else []), *extras]
    return {
        "rows": rows,
        "columns": draw(st.permutations(columns)),
        "with_subject": with_subject,
        "case": draw(st.sampled_from([str.lower, str.upper, str.title])),
        "delimiter": draw(st.sampled_from([",", ";", "\t"])),
        "bom": draw(st.booleans()),
        "newline": draw(st.sampled_from(["\n", "\r\n"])),
        "blank_before": draw(st.lists(st.booleans(), min_size=n + 1, max_size=n + 1)),
    }


def _render(spec: dict) -> tuple[str, list[int]]:
    """The CSV text of ``spec`` and the 1-based line number of every data row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=spec["delimiter"], lineterminator=spec["newline"])
    core = {"path", "label", "subject"}
    line = 0
    lines: list[int] = []

    def blank() -> None:
        nonlocal line
        buffer.write(spec["newline"])
        line += 1

    if spec["blank_before"][0]:
        blank()
    writer.writerow([spec["case"](c) if c in core else c for c in spec["columns"]])
    line += 1
    for row, gap in zip(spec["rows"], spec["blank_before"][1:], strict=True):
        if gap:
            blank()
        values = {"path": row["relative"], "label": row["label_text"],
                  "subject": row["subject"], **row["extras"]}
        writer.writerow([values[c] for c in spec["columns"]])
        line += 1
        lines.append(line)
    return ("\ufeff" if spec["bom"] else "") + buffer.getvalue(), lines


@FAST
@given(spec=manifests())
def test_valid_manifests_round_trip(spec: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "cohort ü"
        for row in spec["rows"]:
            path = base / row["relative"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        text, lines = _render(spec)
        manifest = base / "manifest.csv"
        manifest.write_bytes(text.encode("utf-8"))
        read = read_manifest(manifest)
        assert len(read) == len(spec["rows"])
        for got, row, line in zip(read, spec["rows"], lines, strict=True):
            assert got.path == (base / row["relative"]).resolve()
            assert got.label == row["label"]
            assert got.line == line
            expected_subject = row["subject"] if spec["with_subject"] else ""
            assert got.subject == (expected_subject or row["stem"])
            assert got.extras == row["extras"]


# --------------------------------------------------------------------------- output ids

FILE_NAME = st.text(alphabet=st.characters(exclude_characters="/\x00",
                                           exclude_categories=("Cs",)), min_size=1)


@FAST
@given(name=FILE_NAME)
def test_ids_are_plain_names_that_stay_inside_out(name: str) -> None:
    out = Path("/data/out")
    id_ = image_id(Path("/somewhere") / name)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", id_), id_
    for name in (output_name(derivative_id(id_), "inject", "simulated"),
                 f"{id_}_gradient.nii.gz", f"{id_}_saliency.png"):
        target = out / name
        assert target.parent == out and not target.name.startswith("."), name
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", target.name), name


@FAST
@given(names=st.lists(st.sampled_from(["a", "a_2", "a_3", "A", "b.nii.gz", "b", "ä", "_"])
                      .map(lambda n: n if n.endswith(".nii.gz") else n + ".nii.gz"),
                      min_size=1, max_size=8))
def test_ids_are_unique_for_any_inputs(names: list[str]) -> None:
    inputs = [ExplainInput(Path(f"/d{i}") / name, None) for i, name in enumerate(names)]
    ids = unique_ids(inputs)
    assert len({i.casefold() for i in ids}) == len(ids), ids  # also on case-blind disks


# --------------------------------------------------------------------------- volume change


def _grid(shape: tuple[int, ...]) -> list[torch.Tensor]:
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    return list(torch.meshgrid(*axes, indexing="ij"))


def _affine_field(matrix: torch.Tensor, offset: torch.Tensor,
                  shape: tuple[int, ...]) -> torch.Tensor:
    """``(1, d, *shape)`` displacement ``u_i(p) = sum_j A_ij p_j + b_i`` (voxels)."""
    points = _grid(shape)
    d = len(shape)
    return torch.stack([
        sum(matrix[i, j] * points[j] for j in range(d)) + offset[i] for i in range(d)
    ])[None]


@st.composite
def affine_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    d = draw(st.sampled_from([2, 3]))
    sizes = st.integers(3, 7) if d == 3 else st.integers(3, 12)
    shape = tuple(draw(st.lists(sizes, min_size=d, max_size=d)))
    entry = st.floats(-0.3, 0.3, allow_nan=False)
    matrix = torch.tensor(draw(st.lists(st.lists(entry, min_size=d, max_size=d),
                                        min_size=d, max_size=d)), dtype=torch.float64)
    offset = torch.tensor(draw(st.lists(st.floats(-5, 5), min_size=d, max_size=d)),
                          dtype=torch.float64)
    return matrix, offset, shape


@FAST
@given(case=affine_cases())
def test_affine_field_has_log_volume_change_minus_log_det(case: tuple) -> None:
    matrix, offset, shape = case
    change = log_volume_change(_affine_field(matrix, offset, shape))
    expected = -math.log(float(torch.linalg.det(torch.eye(len(shape)) + matrix)))
    assert change.shape == (1, *shape)
    torch.testing.assert_close(change, torch.full_like(change, expected), atol=1e-9, rtol=0)


@FAST
@given(d=st.sampled_from([2, 3]),
       scale=st.floats(0.5, 2.0).filter(lambda s: abs(s - 1.0) > 1e-3),
       centre=st.floats(-3, 8))
def test_uniform_scaling_sign_and_size(d: int, scale: float, centre: float) -> None:
    """Pulling back with ``p -> c + s (p - c)`` shows a region ``s`` times larger in every
    direction: the anatomy shrinks (negative change) when ``s > 1`` and grows when ``s < 1``."""
    matrix = (scale - 1.0) * torch.eye(d, dtype=torch.float64)
    offset = torch.full((d,), -(scale - 1.0) * centre, dtype=torch.float64)
    change = log_volume_change(_affine_field(matrix, offset, (5,) * d))
    assert torch.all(torch.sign(change) == -math.copysign(1.0, scale - 1.0))
    torch.testing.assert_close(change, torch.full_like(change, -d * math.log(scale)),
                               atol=1e-9, rtol=0)


@FAST
@given(first=affine_cases(), entries=st.lists(st.floats(-0.3, 0.3), min_size=9, max_size=9))
def test_volume_changes_of_composed_affine_warps_add(first: tuple, entries: list) -> None:
    """Warp by ``w`` then by ``u``: ``c(p) = w(p) + u(p + w(p))``, ``I + grad c = (I + A)(I + B)``,
    so ``log_volume_change(c) = log_volume_change(u) + log_volume_change(w)`` exactly."""
    a, _, shape = first
    d = len(shape)
    b = torch.tensor(entries[: d * d], dtype=torch.float64).reshape(d, d)
    zero = torch.zeros(d, dtype=torch.float64)
    total = log_volume_change(_affine_field(b + a + a @ b, zero, shape))
    parts = (log_volume_change(_affine_field(a, zero, shape))
             + log_volume_change(_affine_field(b, zero, shape)))
    torch.testing.assert_close(total, parts, atol=1e-9, rtol=0)


@st.composite
def smooth_fields(draw: st.DrawFn) -> tuple[tuple[int, ...], float, list, list]:
    """Two small sinusoidal displacement fields (max gradient ``g`` per component)."""
    d = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(8, 12 if d == 2 else 9), min_size=d, max_size=d)))
    g = draw(st.floats(0.005, 0.05))

    def component() -> tuple[float, list[float], float]:
        wave = draw(st.lists(st.integers(0, 2), min_size=d, max_size=d)
                    .filter(lambda k: any(k)))
        omega = [2 * math.pi * k / n for k, n in zip(wave, shape, strict=True)]
        amplitude = g * draw(st.floats(-1, 1)) / math.hypot(*omega)
        return amplitude, omega, draw(st.floats(0, 2 * math.pi))

    return shape, g, [component() for _ in range(d)], [component() for _ in range(d)]


def _evaluate(components: list, points: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([
        amplitude * torch.sin(sum(w * p for w, p in zip(omega, points, strict=True)) + phase)
        for amplitude, omega, phase in components
    ])


@FAST
@given(case=smooth_fields())
def test_volume_changes_of_composed_small_warps_add_to_second_order(case: tuple) -> None:
    """For smooth fields with gradients up to ``g`` the sum rule holds up to ``O(g^2)``."""
    shape, g, u_components, w_components = case
    points = _grid(shape)
    w = _evaluate(w_components, points)
    moved = [p + w[i] for i, p in enumerate(points)]
    composite = w + _evaluate(u_components, moved)
    u = _evaluate(u_components, points)
    error = (log_volume_change(composite[None]) - log_volume_change(u[None])
             - log_volume_change(w[None])).abs().max()
    assert float(error) <= 6 * g**2
