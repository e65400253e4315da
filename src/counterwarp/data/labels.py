"""Label mapping of a manifest with string labels: which value is diseased, which healthy.

With ``positive_label`` naming the diseased value, every other value must be a known
healthy one: the values given as ``negative_labels`` when given (``--negative-labels
CN,HC``); otherwise one of :data:`HEALTHY_LABELS` (any case), or the manifest's only other
value. Anything else (``MCI``, or ``ad`` beside ``AD``: values are compared exactly) is
refused with the rows that hold it, never quietly read as healthy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from counterwarp.errors import CounterwarpError

HEALTHY_LABELS: frozenset[str] = frozenset(
    {"0", "cn", "hc", "nc", "control", "controls", "healthy", "normal"}
)
"""Label values read as healthy beside ``positive_label`` without ``negative_labels``
(compared case-insensitively)."""


def parse_negative_labels(
    negative_labels: str | Sequence[str] | None,
) -> tuple[str, ...] | None:
    """``"CN,HC"`` (or ``["CN", "HC"]``) -> ``("CN", "HC")``; None stays None.

    Raises:
        CounterwarpError: an empty list or an empty value.
    """
    if negative_labels is None:
        return None
    items = negative_labels.split(",") if isinstance(negative_labels, str) else negative_labels
    values = tuple(str(item).strip() for item in items)
    if not values or not all(values):
        raise CounterwarpError(
            f"--negative-labels {negative_labels!r}: give the healthy label values separated "
            "by commas, e.g. --negative-labels CN,HC"
        )
    return tuple(dict.fromkeys(values))


def check_label_mapping(
    raw_rows: Sequence[tuple[int, dict[str, str]]],
    label_key: str,
    positive_label: str,
    negative_labels: tuple[str, ...] | None,
    manifest: Path,
) -> None:
    """Refuse label values that are neither ``positive_label`` nor a known healthy value."""
    seen = sorted({raw[label_key] for _, raw in raw_rows})
    if positive_label not in seen:
        shown = ", ".join(repr(v) for v in seen[:10])
        raise CounterwarpError(
            f"manifest {manifest}: positive label {positive_label!r} never occurs in "
            f"column 'label' (values seen: {shown}). Check the spelling."
        )
    if negative_labels is not None:
        if positive_label in negative_labels:
            raise CounterwarpError(
                f"--negative-labels names the positive label {positive_label!r}; a value is "
                "either diseased or healthy."
            )
        known = set(negative_labels)
    else:
        others = [v for v in seen if v != positive_label]
        known = {v for v in others if v.lower() in HEALTHY_LABELS}
        if len(others) == 1:
            known.add(others[0])
    unknown = [v for v in seen if v != positive_label and v not in known]
    if not unknown:
        return
    lines: dict[str, list[int]] = {}
    for line, raw in raw_rows:
        lines.setdefault(raw[label_key], []).append(line)

    def where(value: str) -> str:
        found = lines[value]
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        return f"{value!r} (line{'s' if len(found) > 1 else ''} " + ", ".join(
            str(n) for n in found[:5]
        ) + f"{more})"

    cases = [v for v in unknown if v.casefold() == positive_label.casefold()]
    hint = (
        f" Values are compared exactly: {cases[0]!r} is not {positive_label!r}; fix the "
        "case in the manifest if it means diseased."
        if cases
        else ""
    )
    example = ",".join([*sorted(known), *unknown])
    raise CounterwarpError(
        f"manifest {manifest}: label value(s) {', '.join(where(v) for v in unknown)} are "
        f"neither the positive label {positive_label!r} nor a known healthy value"
        f"{' (' + ', '.join(repr(v) for v in sorted(known)) + ')' if known else ''}.{hint} "
        f"Say which values are healthy with train-classifier --negative-labels (e.g. "
        f"--negative-labels {example}; later commands use the run's), or remove those rows."
    )
