"""A classifier counterwarp did not train: loading it, adapting its output, checking it.

Three ways in, none of which unpickles a user's file:

- a TorchScript file (``torch.jit.save``), read with ``torch.jit.load``;
- a ``torch.export`` program (``.pt2``), read with ``torch.export.load``;
- ``package.module:factory`` plus a state dict: the factory (named by the user) is imported
  and called with no arguments, the weights are read with ``torch.load(weights_only=True)``.

:class:`ContractClassifier` wraps the model so the rest of counterwarp sees what it always
sees, ``(B, 1, *S)`` images -> ``(B,)`` scores: it repeats the image into the model's input
channels and picks the explained score from the model's outputs (one logit, logit ``k`` of
C, the log-odds of class ``k`` against the rest, or a regression value; see
:mod:`counterwarp.data.contract`). :func:`check_classifier` runs it once on a dummy batch
before any output exists and refuses, in one line that says what to change, a wrong output
shape, non-finite scores, a model whose score does not depend on its input, and a model
left in training mode.
"""

from __future__ import annotations

import importlib
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from counterwarp.errors import CounterwarpError

#: The kinds of classifier source :func:`load_external` reads.
KINDS = ("torchscript", "export", "factory")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ContractClassifier(nn.Module):
    """``(B, 1, *S)`` images -> ``(B,)`` explained scores of a user's model.

    Args:
        model: the user's module; takes ``(B, channels, *S)``.
        output: ``"logit"``, ``"class"`` or ``"regression"``.
        class_index: which of the model's C outputs (``class``; ``logit`` of C outputs).
        channels: input channels the model takes; the one image is repeated into each.
    """

    def __init__(
        self, model: nn.Module, output: str = "logit", class_index: int | None = None,
        channels: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.class_index = class_index
        self.channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = images
        if self.channels > 1:
            inputs = images.expand(-1, self.channels, *images.shape[2:])
        result = self.model(inputs)
        if not isinstance(result, torch.Tensor):
            raise CounterwarpError(
                f"the classifier returned {type(result).__name__}, not a tensor; wrap it so "
                "that forward returns the output tensor only (B,), (B, 1) or (B, C)"
            )
        return select_score(result, images.shape[0], self.output, self.class_index)


class ExportedProgramModule(nn.Module):
    """A ``torch.export`` program's module, held so that ``train()`` / ``eval()`` (which
    an exported module refuses: its graph is fixed as exported) leave it alone."""

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.__dict__["graph_module"] = graph_module  # outside the module tree on purpose

    def train(self, mode: bool = True) -> ExportedProgramModule:
        self.training = mode
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.__dict__["graph_module"](inputs)


def select_score(
    result: torch.Tensor, batch: int, output: str, class_index: int | None
) -> torch.Tensor:
    """The explained ``(B,)`` score from a model's output ``(B,)``, ``(B, 1)`` or ``(B, C)``."""
    if result.ndim == 1 and result.shape[0] == batch:
        result = result[:, None]
    if result.ndim != 2 or result.shape[0] != batch:
        raise CounterwarpError(
            f"the classifier returned shape {tuple(result.shape)} for a batch of {batch}; "
            f"it must return ({batch},), ({batch}, 1) or ({batch}, C)"
        )
    n_outputs = result.shape[1]
    if output == "class":
        if n_outputs < 2 or class_index is None or class_index >= n_outputs:
            raise CounterwarpError(
                f"the contract explains class {class_index} but the classifier returns "
                f"{n_outputs} output(s) per image; set class_index to 0..{n_outputs - 1} "
                "(\"output\": \"class\" needs a model with 2 or more class logits)"
            )
        others = torch.cat([result[:, :class_index], result[:, class_index + 1:]], dim=1)
        return result[:, class_index] - torch.logsumexp(others, dim=1)
    if n_outputs == 1 and not class_index:
        return result[:, 0]
    if output == "logit" and class_index is not None and class_index < n_outputs:
        return result[:, class_index]
    raise CounterwarpError(
        f"the classifier returns {n_outputs} outputs per image; the contract must say which "
        f"to explain: \"class_index\": 0..{n_outputs - 1} (with \"output\": \"class\" for the "
        "log-odds of that class against the rest)"
        if n_outputs > 1 else
        f"the contract names class_index {class_index} but the classifier returns one output"
    )


def source_kind(spec: str) -> str:
    """``"factory"`` for ``package.module:factory``, else the kind of the file ``spec``."""
    path = Path(spec).expanduser()
    if not path.exists() and _FACTORY.match(spec):
        return "factory"
    if not path.is_file():
        raise CounterwarpError(
            f"--classifier {spec}: no such file, and not package.module:factory; give a "
            "TorchScript file, a torch.export .pt2 file, or module:factory with --weights"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        names = []
    if any("serialized_exported_program" in n or "/models/" in n for n in names):
        return "export"
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        raise CounterwarpError(
            f"--classifier {spec}: a torch.save file (weights or a pickled model), which "
            "counterwarp never unpickles; save the model with torch.jit.save or "
            "torch.export.save, or give module:factory with --weights FILE"
        )
    raise CounterwarpError(
        f"--classifier {spec}: not a TorchScript or torch.export file (unreadable archive); "
        "save the model with torch.jit.save(torch.jit.script(model), path)"
    )


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CounterwarpError(
            f"--weights {path}: cannot read it as plain weights ({type(error).__name__}); "
            "save them with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CounterwarpError(
            f"--weights {path}: not a state dict (a mapping of names to tensors); save "
            "model.state_dict()"
        )
    return state


def _from_factory(spec: str, weights: Path | None) -> nn.Module:
    module_name, _, function_name = spec.partition(":")
    if weights is None:
        raise CounterwarpError(f"--classifier {spec} needs --weights FILE (its state dict)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CounterwarpError(
            f"--classifier {spec}: cannot import {module_name} ({error}); install it or add "
            "its folder to PYTHONPATH"
        ) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise CounterwarpError(
            f"--classifier {spec}: {module_name} has no callable {function_name}"
        )
    try:
        model = factory()
    except Exception as error:
        first = (str(error).splitlines() or [""])[0][:200]
        raise CounterwarpError(
            f"--classifier {spec}: {function_name}() failed ({type(error).__name__}: {first}); "
            "the factory must build the model when called with no arguments"
        ) from None
    if not isinstance(model, nn.Module):
        raise CounterwarpError(
            f"--classifier {spec}: {function_name}() returned {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    try:
        model.load_state_dict(_load_weights(weights))
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CounterwarpError(
            f"--weights {weights} does not fit {spec}() ({first}); give the state dict "
            "saved from that model"
        ) from None
    return model.eval()  # counterwarp built it, so it puts it in inference mode


def load_external(
    kind: str, source: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The user's model, on ``device``, parameters frozen. ``kind`` is one of :data:`KINDS`;
    ``source`` the file (``torchscript``, ``export``) or ``module:factory``."""
    weights = None if weights is None else Path(weights).expanduser()
    if kind == "factory":
        model = _from_factory(str(source), weights)
    else:
        path = Path(source).expanduser()
        try:
            if kind == "torchscript":
                model = torch.jit.load(str(path), map_location="cpu")
            else:
                model = ExportedProgramModule(torch.export.load(str(path)).module())
        except Exception as error:
            first = (str(error).splitlines() or [""])[0][:200]
            raise CounterwarpError(
                f"--classifier {path}: cannot load it as {kind} ({type(error).__name__}: "
                f"{first}); re-save it with this torch version"
            ) from None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if kind == "export":
        if torch.device(device).type != "cpu":
            raise CounterwarpError(
                "a torch.export classifier runs where it was exported; export it on "
                f"{device} or use --device cpu"
            )
        return model
    return model.to(device)


def check_classifier(
    classifier: ContractClassifier, input_shape: tuple[int, ...], where: str,
    device: str | torch.device = "cpu",
) -> None:
    """Run ``classifier`` on a dummy batch ``(2, 1, *input_shape)`` and refuse a model that
    cannot be explained (see the module doc); ``where`` names it in the message."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((2, 1, *input_shape), generator=generator).to(device)
    try:
        with torch.no_grad():
            scores = classifier(images)
            again = classifier(images)
            alone = classifier(images[:1])
    except CounterwarpError as error:
        raise CounterwarpError(f"{where}: {error}") from None
    except Exception as error:
        first = (str(error).splitlines() or [""])[0][:200]
        fix = ("export it with a dynamic batch size (torch.export.export(model, (x,), "
               "dynamic_shapes=({0: torch.export.Dim('batch')},)))" if "Guard failed" in first
               else "check input_shape and channels in the contract")
        raise CounterwarpError(
            f"{where}: the model fails on a (2, {classifier.channels}, "
            f"{', '.join(map(str, input_shape))}) batch or on one image ({type(error).__name__}"
            f": {first}); {fix}"
        ) from None
    if not torch.isfinite(scores).all():
        raise CounterwarpError(
            f"{where}: the model returns non-finite scores ({scores.tolist()}) on a dummy "
            "batch; check its weights and the contract's intensity normalisation"
        )
    if not torch.allclose(scores, again) or not torch.allclose(scores[:1], alone, atol=1e-4,
                                                               rtol=1e-3):
        raise CounterwarpError(
            f"{where}: the model's output changes between calls or with the batch around an "
            "image (dropout or batch statistics): it is in training mode; call model.eval() "
            "before saving it"
        )
    images.requires_grad_(True)
    with torch.enable_grad():
        score = classifier(images).sum()
        gradient = (torch.autograd.grad(score, images, allow_unused=True)[0]
                    if score.requires_grad else None)
    if gradient is None or not bool(gradient.abs().sum() > 0):
        raise CounterwarpError(
            f"{where}: the model's score does not depend on its input (zero gradient on a "
            "dummy batch), so nothing can explain it; check that forward uses its input and "
            "that the weights are loaded"
        )
