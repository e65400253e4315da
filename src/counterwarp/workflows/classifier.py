"""The classifier a run explains: counterwarp's own ``classifier.pt``, or one the user brings.

``--classifier SPEC [--weights FILE] --contract classifier.json`` names a model counterwarp
did not train (:mod:`counterwarp.nn.external`) and its input contract
(:mod:`counterwarp.data.contract`). ``fit`` records it in the run folder, so every later
command explains the same model without being told again:

- ``RUN/classifier.json``: the contract, the kind of model, the name of its file inside the
  run (or the ``module:factory``) and that file's sha256;
- ``RUN/classifier_model.ts`` (TorchScript), ``RUN/classifier_model.pt2`` (torch.export) or
  ``RUN/classifier_weights.pt`` (the factory's state dict): a copy of the user's file, so the
  run still works when the original moves or changes.

The run's classifier *digest*, which ``simulator.pt`` and every explain folder record, is
then the sha256 of ``classifier.json`` (which itself holds the model file's digest); for
counterwarp's own classifier it stays the sha256 of ``classifier.pt``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from counterwarp._io import write_json_atomic
from counterwarp.data.contract import ClassifierContract, parse_contract, read_contract
from counterwarp.errors import CounterwarpError
from counterwarp.nn.classifier import CLASSIFIER_NAME
from counterwarp.nn.external import ContractClassifier, check_classifier, load_external, source_kind
from counterwarp.train.staging import file_digest

#: The record of a brought classifier inside a run folder.
CONTRACT_NAME = "classifier.json"
#: The run's copy of the brought model's file, by kind.
MODEL_FILE_NAMES = {
    "torchscript": "classifier_model.ts",
    "export": "classifier_model.pt2",
    "factory": "classifier_weights.pt",
}
RECORD_FORMAT = "counterwarp.external-classifier"


@dataclass(frozen=True)
class ClassifierSource:
    """A brought classifier: what to load and how to feed it.

    Attributes:
        kind: ``torchscript``, ``export`` or ``factory``.
        file: the model file (TorchScript / export) or the factory's weights.
        factory: ``package.module:factory`` (kind ``factory``), else None.
        contract: its input contract.
    """

    kind: str
    file: Path
    factory: str | None
    contract: ClassifierContract

    @property
    def where(self) -> str:
        return self.factory or str(self.file)

    @cached_property
    def file_sha256(self) -> str:
        """sha256 of :attr:`file`, read once."""
        return file_digest(self.file)

    def record(self) -> dict[str, Any]:
        """``RUN/classifier.json`` for this source, its file copied as ``MODEL_FILE_NAMES``."""
        return {
            "format": RECORD_FORMAT,
            "kind": self.kind,
            "file": MODEL_FILE_NAMES[self.kind],
            "file_sha256": self.file_sha256,
            "factory": self.factory,
            "contract": self.contract.to_dict(),
        }


def classifier_source(
    spec: str, weights: str | Path | None, contract: str | Path | None
) -> ClassifierSource:
    """Check ``--classifier SPEC [--weights FILE] --contract FILE`` and say what it names."""
    kind = source_kind(spec)
    if contract is None:
        raise CounterwarpError(
            f"--classifier {spec} needs --contract FILE: a JSON file stating at least its "
            "input_shape (e.g. {\"input_shape\": [32, 32, 32]}); see docs/classifiers.md"
        )
    if kind == "factory":
        if weights is None:
            raise CounterwarpError(f"--classifier {spec} needs --weights FILE (its state dict)")
        file = Path(weights).expanduser()
        if not file.is_file():
            raise CounterwarpError(f"--weights {file}: no such file")
        return ClassifierSource(kind, file.resolve(), spec, read_contract(contract))
    if weights is not None:
        raise CounterwarpError(
            f"--weights is for --classifier module:factory; {spec} holds its weights already"
        )
    return ClassifierSource(kind, Path(spec).expanduser().resolve(), None, read_contract(contract))


def load_source(
    source: ClassifierSource, device: str | torch.device = "cpu"
) -> tuple[ContractClassifier, dict[str, Any]]:
    """The adapted, checked model of ``source`` and a payload like a checkpoint's."""
    contract = source.contract
    if source.kind == "torchscript":
        model = load_external("torchscript", source.file, device=device)
        if model.training:
            raise CounterwarpError(
                f"{source.where}: the TorchScript model was saved in training mode (dropout "
                "and batch statistics change its output); call model.eval() before "
                "torch.jit.save"
            )
    else:
        model = load_external(source.kind, source.factory or source.file, source.file
                              if source.kind == "factory" else None, device=device)
    adapted = ContractClassifier(model, contract.output, contract.class_index, contract.channels)
    check_classifier(adapted, contract.input_shape, source.where, device=device)
    payload = {
        "config": {"input_shape": list(contract.input_shape)},
        "positive_label": contract.positive_label,
        "contract": contract.to_dict(),
        "classifier": source.record(),
    }
    return adapted, payload


def read_record(run: Path) -> dict[str, Any] | None:
    """``RUN/classifier.json`` checked, or None when the run uses its own ``classifier.pt``."""
    path = run / CONTRACT_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CounterwarpError(f"{path}: unreadable classifier record ({error})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise CounterwarpError(
            f"{path} is not a counterwarp classifier record; `fit --classifier SPEC "
            "--contract FILE` writes it (a contract file of your own goes elsewhere)"
        )
    if record.get("kind") not in MODEL_FILE_NAMES or record.get("file") != MODEL_FILE_NAMES[
        record["kind"]
    ]:
        raise CounterwarpError(f"{path}: damaged classifier record; rerun `fit --classifier`")
    model_file = run / record["file"]
    if not model_file.is_file():
        raise CounterwarpError(
            f"{model_file} is missing (named by {path}); rerun `counterwarp fit --classifier "
            f"SPEC --contract FILE --run {run}`"
        )
    if file_digest(model_file) != record.get("file_sha256"):
        raise CounterwarpError(
            f"{model_file} is not the file {path} recorded (changed since); rerun `counterwarp "
            f"fit --classifier SPEC --contract FILE --run {run}`"
        )
    return record


def recorded_source(run: Path, record: dict[str, Any]) -> ClassifierSource:
    """The :class:`ClassifierSource` a run's ``classifier.json`` names."""
    contract = parse_contract(record.get("contract"), str(run / CONTRACT_NAME))
    return ClassifierSource(record["kind"], run / record["file"], record.get("factory"), contract)


def classifier_digest(run: Path) -> str:
    """The digest the run's simulator and outputs are bound to (see the module doc)."""
    record = run / CONTRACT_NAME
    return file_digest(record if record.is_file() else run / CLASSIFIER_NAME)


def used_classifier_digest(run: Path, source: ClassifierSource | None) -> str:
    """The sha256 of the classifier a command used: ``--classifier``'s model file when
    given, else the run's own (:func:`classifier_digest`)."""
    return source.file_sha256 if source is not None else classifier_digest(Path(run))


def record_digest(source: ClassifierSource) -> str:
    """The sha256 ``RUN/classifier.json`` will have once :func:`stage_source` wrote it."""
    text = json.dumps(source.record(), indent=2, sort_keys=False) + "\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def same_source(record: dict[str, Any] | None, source: ClassifierSource) -> bool:
    """Whether ``source`` is the classifier a run recorded (same model file and contract)."""
    if record is None:
        return False
    mine = source.record()
    return all(record.get(key) == mine[key] for key in ("kind", "file_sha256", "factory",
                                                        "contract"))


def stage_source(source: ClassifierSource, folder: Path) -> list[str]:
    """Copy ``source``'s file and write its record into ``folder`` (a staging folder);
    returns the names written, for the staging commit."""
    record = source.record()
    copy = folder / record["file"]
    shutil.copyfile(source.file, copy)
    if file_digest(copy) != record["file_sha256"]:
        raise CounterwarpError(f"{source.file} changed while it was copied; try again")
    write_json_atomic(folder / CONTRACT_NAME, record)
    if file_digest(folder / CONTRACT_NAME) != record_digest(source):
        raise CounterwarpError(f"{folder / CONTRACT_NAME}: written differently than recorded")
    return [record["file"], CONTRACT_NAME]
