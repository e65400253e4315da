"""The README tells the truth: its Python snippet runs, its command lines parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch

from counterwarp.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- api-snippet -->\s*```python\n(.*?)```\s*<!-- /api-snippet -->",
                      text, re.S)
    assert block, "README lacks the marked Python snippet"
    return block.group(1)


def test_readme_python_snippet_runs_and_explains(capsys):
    namespace: dict = {}
    exec(compile(_snippet(), str(README), "exec"), namespace)
    explanation = namespace["explanation"]
    assert explanation.simulated.shape == (4, 1, 16, 16, 16)
    assert explanation.log_volume_change.shape == (4, 16, 16, 16)
    assert torch.isfinite(explanation.log_volume_change).all()
    assert namespace["saliency"].shape == (4, 16, 16, 16)
    assert "torch.Size([4, 3, 16, 16, 16])" in capsys.readouterr().out


def test_readme_command_lines_parse():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [
        line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()
        if line.strip().startswith("counterwarp ")
    ]
    assert len(lines) >= 9
    seen = set()
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        seen.add(args.command)
    assert {"synth", "train-classifier", "fit", "explain", "saliency", "group", "benchmark",
            "report", "demo"} <= seen
