"""Test helper (not a test): run counterwarp commands in every process of a torchrun launch.

``python -m torch.distributed.run --standalone --nproc_per_node N tests/distributed_worker.py
JSON`` where JSON is an object with:

- ``"commands"``: a list of ``counterwarp`` argv lists, run one after the other (each must
  exit 0);
- ``"no_dropout"``: train the classifier and the simulator without dropout (dropout masks
  are drawn per rank, so only without dropout can N processes match one process number
  for number).
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

from torch import nn


def simulator_without_dropout(*args: Any, **kwargs: Any) -> nn.Module:
    """A :class:`~counterwarp.nn.simulator.SimulatorNet` whose dropout layers drop nothing."""
    from counterwarp.nn.simulator import SimulatorNet

    net = SimulatorNet(*args, **kwargs)
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return net


def switch_off_dropout(patch: Any) -> None:
    """Make the training code build its networks without dropout.

    ``patch(module, name, value)`` sets the attribute (``setattr``, or pytest's
    ``monkeypatch.setattr`` so that the change is undone after a test).
    """
    import counterwarp.train.classifier as classifier_training
    import counterwarp.train.simulator as simulator_training
    from counterwarp.nn.classifier import Classifier

    patch(classifier_training, "Classifier", functools.partial(Classifier, dropout=0.0))
    patch(simulator_training, "SimulatorNet", simulator_without_dropout)


def main() -> int:
    from counterwarp.cli import main as cli_main

    options = json.loads(sys.argv[1])
    if options.get("no_dropout"):
        switch_off_dropout(setattr)
    for argv in options["commands"]:
        status = cli_main(argv)
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
