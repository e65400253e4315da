"""The README tells the truth: its Python snippet runs, its command lines parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from counterwarp.cli import build_parser, main

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


#: Options the walkthrough test adds to the README's commands, for speed only.
_FAST = {"fit": ["--steps", "2", "--batch-size", "2"], "saliency": ["--occlusion-patch", "8"]}


def test_readme_bring_your_own_classifier_walkthrough_runs(tmp_path, monkeypatch):
    """The walkthrough's Python saves the model, its JSON is the contract, and its four
    commands run in order on a small synthetic cohort (with fewer steps)."""
    pytest.importorskip("monai", reason="the walkthrough's model is MONAI's DenseNet121")
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- byo-walkthrough -->(.*?)<!-- /byo-walkthrough -->", text, re.S)
    assert block, "README lacks the marked bring-your-own-classifier walkthrough"
    python = re.search(r"```python\n(.*?)```", block.group(1), re.S).group(1)
    contract = re.search(r"```json\n(.*?)```", block.group(1), re.S).group(1)
    commands = [line.strip() for line in
                re.search(r"```bash\n(.*?)```", block.group(1), re.S).group(1).splitlines()
                if line.strip()]
    assert [shlex.split(c)[1] for c in commands] == ["fit", "explain", "saliency", "report"]
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", "cohort", "--n", "8", "--shape", "16", "16", "16"]) == 0
    exec(compile(python, str(README), "exec"), {})
    (tmp_path / "classifier.json").write_text(contract)
    for command in commands:
        args = shlex.split(command)[1:]
        assert main(args + _FAST.get(args[0], [])) == 0, command
    assert (tmp_path / "byo" / "classifier_model.ts").is_file()
    assert (tmp_path / "byo" / "explain" / "summary.csv").is_file()
    assert (tmp_path / "byo" / "saliency" / "saliency_index.csv").is_file()
    assert "simulator" in (tmp_path / "byo" / "report.html").read_text(encoding="utf-8")
