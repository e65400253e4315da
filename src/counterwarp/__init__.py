"""counterwarp: explain image classifiers with a conditional warping simulator.

The public API is imported lazily so that ``counterwarp --help`` stays fast:

- :func:`synth` (synthetic cohorts with ground truth), :func:`train_classifier`,
  :func:`load_classifier`, :class:`Classifier`;
- :class:`Simulator` (``fit`` / ``explain`` / ``save`` / ``load``) and :class:`Explanation`;
- :func:`saliency_map`, :func:`log_volume_change`, :func:`jacobian_determinant`;
- run-folder workflows :func:`fit_run`, :func:`explain_run`, :func:`saliency_run`,
  :func:`run_demo`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "synth": "counterwarp.data.synthetic",
    "read_manifest": "counterwarp.data.manifest",
    "ManifestDataset": "counterwarp.data.manifest",
    "train_classifier": "counterwarp.train.classifier",
    "Classifier": "counterwarp.nn.classifier",
    "load_classifier": "counterwarp.nn.classifier",
    "Simulator": "counterwarp.explain.simulator",
    "Explanation": "counterwarp.explain.simulator",
    "saliency_map": "counterwarp.explain.saliency",
    "log_volume_change": "counterwarp.geometry.volume",
    "jacobian_determinant": "counterwarp.geometry.volume",
    "fit_run": "counterwarp.workflows.fit",
    "explain_run": "counterwarp.workflows.explain",
    "saliency_run": "counterwarp.workflows.saliency",
    "run_demo": "counterwarp.workflows.demo",
    "run_benchmark": "counterwarp.workflows.benchmark",
    "CounterwarpError": "counterwarp.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'counterwarp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
