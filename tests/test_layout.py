"""The package's layers: every import points down (cli, images -> workflows -> prepare /
explain / train / report -> stats / nn / data / losses -> geometry -> errors, _io), and no
module is long."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "counterwarp"

_BASE = {"errors", "_io", "limits", "__version__"}
#: What each part of the package may import from counterwarp (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_io": {"errors"},
    "limits": {"errors"},
    "distributed": {"errors"},
    "global_batchnorm": {"distributed", "errors"},
    "geometry": _BASE,
    "nn": _BASE | {"geometry"},
    "losses": _BASE | {"geometry"},
    "data": _BASE | {"geometry"},
    "stats": _BASE,
    "train": _BASE | {"geometry", "nn", "data", "losses", "stats", "distributed",
                      "global_batchnorm"},
    "report": _BASE | {"geometry", "stats", "data"},
    "explain": _BASE | {"geometry", "nn", "data", "losses", "stats", "train"},
    "prepare": _BASE | {"geometry", "data", "report"},
    "workflows": _BASE | {"geometry", "nn", "data", "losses", "stats", "train", "explain",
                          "report", "distributed", "global_batchnorm", "prepare"},
    "images": _BASE | {"geometry", "nn", "data", "losses", "stats", "train", "explain",
                       "report", "prepare", "workflows"},
}
MAX_LINES = 440


def _part(module: Path) -> str:
    relative = module.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(module: Path) -> set[str]:
    """The counterwarp parts a module imports (``from counterwarp import x`` names x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = node.module.split(".")
            if names[0] != "counterwarp":
                continue
            if len(names) > 1:
                found.add(names[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "counterwarp" and len(names) > 1:
                    found.add(names[1])
    return found


def test_every_import_points_down_the_layers():
    upward = []
    for module in sorted(PACKAGE.rglob("*.py")):
        part = _part(module)
        if part not in ALLOWED:
            continue  # cli, __init__, __main__: the top
        for imported in sorted(_imported_parts(module) - ALLOWED[part] - {part}):
            upward.append(f"{module.relative_to(PACKAGE)} imports counterwarp.{imported}")
    assert not upward, "\n".join(upward)


def test_every_part_of_the_package_has_a_place_in_the_layers():
    parts = {_part(m) for m in PACKAGE.rglob("*.py")} - {"cli", "__init__", "__main__"}
    assert parts <= set(ALLOWED), parts - set(ALLOWED)


def test_no_module_is_long():
    long = {
        str(m.relative_to(PACKAGE)): n for m in PACKAGE.rglob("*.py")
        if (n := len(m.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long
