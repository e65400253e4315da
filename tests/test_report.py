"""``report_run``: one self-contained HTML file, checked as text and in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from counterwarp.cli import main
from counterwarp.report.markup import markdown_to_html
from counterwarp.workflows.fit import fit_run
from counterwarp.workflows.report import report_run

TINY_FIT = {"steps": 4, "batch_size": 4, "channels": (4, 8, 8), "latent_dim": 16,
            "checkpoint_every": 2, "field": "velocity"}
BENCHMARK_MD = """# Benchmark <results>

| method | pearson | auroc |
|---|---:|---:|
| counterwarp | 0.61 | 0.90 |
| gradient `abs` | 0.20 | 0.71 |

- a note with <b>tags</b> & an [external link](https://example.org)
"""
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
CHECKER = """<script>
(function () {
  var problems = [];
  window.addEventListener('error', function (event) {
    problems.push('error: ' + (event.message || (event.target && event.target.tagName)));
  }, true);
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    var result = {
      images: images.length,
      loaded: images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
      problems: problems
    };
    var out = document.createElement('pre');
    out.id = 'cw-check';
    out.textContent = JSON.stringify(result);
    document.body.appendChild(out);
  });
})();
</script>"""


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cohort, run = root / "cohort", root / "run"
    assert main(["synth", "--out", str(cohort), "--n", "24", "--dim", "2",
                 "--shape", "32", "32", "--seed", "3"]) == 0
    assert main(["train-classifier", "--manifest", str(cohort / "manifest.csv"),
                 "--out", str(run), "--epochs", "2"]) == 0
    fit_run(cohort / "manifest.csv", run, progress=False, **TINY_FIT)
    (run / "benchmark").mkdir()
    (run / "benchmark" / "results.md").write_text(BENCHMARK_MD, encoding="utf-8")
    report = report_run(run)
    return cohort, run, report


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def test_report_is_one_self_contained_file(fitted_run):
    _, run, report = fitted_run
    assert report == run / "report.html"
    text = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "@import" not in text and "url(" not in text
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(sources) >= 8
    assert all(s.startswith(("data:image/png;base64,", "data:image/gif;base64,"))
               for s in sources)
    for heading in ("Cohort and classifier", "Simulator", "Group maps", "Held-out subjects",
                    "Benchmark"):
        assert heading in text
    # the benchmark table, with every bit of its text escaped
    assert "<td>counterwarp</td>" in text and "<code>abs</code>" in text
    assert "&lt;b&gt;tags&lt;/b&gt; &amp;" in text and "<b>tags" not in text
    assert "Benchmark &lt;results&gt;" in text


def test_report_computes_group_maps_in_template_space(fitted_run):
    cohort, run, report = fitted_run
    group = run / "group"
    reference = nib.load(next((cohort / "images").glob("*.nii.gz")))
    for direction in ("inject", "remove"):
        for name in ("mean", "t", "p", "fdr_mask"):
            image = nib.load(group / f"group_{direction}_{name}.nii.gz")
            assert image.shape == reference.shape
            np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
        summary = json.loads((group / f"group_{direction}_summary.json").read_text())
        assert "template space" in summary["space"]
        regions = (group / f"group_{direction}_regions.csv").read_text().splitlines()
        assert regions[0].startswith("label,name,mean_log_volume_change")
        assert len(regions) == 1 + 4 + 1  # four effect regions, then "outside"
    assert "left_hippocampus" in report.read_text(encoding="utf-8")


def test_report_degrades_gracefully_without_a_simulator(fitted_run, tmp_path):
    _, run, _ = fitted_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("classifier.pt", "split.json", "classifier_metrics.json", "classifier_log.csv"):
        shutil.copy(run / name, bare / name)
    report = report_run(bare, compute=False)
    text = report.read_text(encoding="utf-8")
    assert "simulator not fitted yet" in text
    assert "no benchmark results yet" in text
    assert not (bare / "group").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no split.json" in report_run(empty).read_text(encoding="utf-8")


def test_markdown_tables_and_escaping():
    rendered = markdown_to_html(
        "| a | b<c |\n|---|---:|\n| 1 \\| 2 | `x` |\n\ntext **bold**"
    )
    assert '<th class="num">b&lt;c</th>' in rendered
    assert "<td>1 | 2</td>" in rendered and '<td class="num"><code>x</code></td>' in rendered
    assert "<p>text <strong>bold</strong></p>" in rendered


def test_report_renders_in_headless_chromium(fitted_run, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium or `chromium` on PATH); "
                    "install Debian's `chromium` package to run this check")
    _, _, report = fitted_run
    text = report.read_text(encoding="utf-8")
    checked = tmp_path / "checked.html"
    checked.write_text(text.replace("</body>", CHECKER + "\n</body>"), encoding="utf-8")
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [chromium, *flags, "--enable-logging=stderr", "--v=0", "--dump-dom",
         checked.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    match = re.search(r'<pre id="cw-check">(.*?)</pre>', dom.stdout)
    assert match, f"Chromium did not run the check; stderr: {dom.stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"'))
    n_images = len(re.findall(r"<img\s", text))
    assert result["images"] == n_images > 0
    assert result["loaded"] == n_images, result
    assert result["problems"] == []
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console

    # the report itself, as a user sees it
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2000",
         report.as_uri()],
        capture_output=True, timeout=180, check=False,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000
    with Image.open(shot) as picture:
        assert picture.size == (1280, 2000)
        assert len(picture.convert("L").getcolors(1 << 16) or range(1 << 16)) > 16
