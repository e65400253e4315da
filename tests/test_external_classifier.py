"""A classifier counterwarp did not train: its contract, its output adapter, the checks at
the boundary (each bad model gets a one-line error saying what to change) and the loaders
(TorchScript, torch.export, module:factory + weights; no user file is unpickled)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from counterwarp.data.contract import normalise_intensity, parse_contract, read_contract
from counterwarp.errors import CounterwarpError
from counterwarp.nn.external import ContractClassifier, check_classifier, select_score, source_kind
from counterwarp.workflows.classifier import classifier_source, load_source

SHAPE = (8, 8, 8)


class MeanModel(nn.Module):
    """(B, C, *S) -> (B, outputs): weights times the mean intensity of each channel."""

    def __init__(self, outputs: int = 1, channels: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3, 4)))


def _contract(tmp_path: Path, **values) -> Path:
    path = tmp_path / "classifier.json"
    path.write_text(json.dumps({"input_shape": list(SHAPE), **values}))
    return path


# ------------------------------------------------------------------------------ contract


def test_contract_defaults_and_round_trip():
    contract = parse_contract({"input_shape": [8, 8, 8]})
    assert (contract.channels, contract.intensity, contract.orientation, contract.output) == (
        1, "zscore-brain", "RAS", "logit")  # 3D images are brought to RAS unless told
    assert parse_contract({"input_shape": [8, 8]}).orientation is None  # 2D: no orientation
    as_stored = parse_contract({"input_shape": [8, 8, 8], "orientation": None})
    assert as_stored.orientation is None
    assert parse_contract(as_stored.to_dict()) == as_stored
    fixed = parse_contract({"input_shape": [8, 8, 8], "intensity": {"mean": 3, "sd": 2},
                            "orientation": "las", "output": "class", "class_index": 1})
    assert fixed.intensity == (3.0, 2.0) and fixed.orientation == "LAS"
    assert parse_contract(fixed.to_dict()) == fixed


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"input_shape": [8, 8]}, None),  # valid 2D: no error
        ({}, "input_shape"),
        ({"input_shape": [8, 0, 8]}, "input_shape"),
        ({"input_shape": [8, 8, 8], "channels": 0}, "channels"),
        ({"input_shape": [8, 8, 8], "intensity": "robust"}, "intensity"),
        ({"input_shape": [8, 8, 8], "intensity": {"mean": 0, "sd": 0}}, "intensity"),
        ({"input_shape": [8, 8, 8], "orientation": "RRS"}, "orientation"),
        ({"input_shape": [8, 8], "orientation": "RAS"}, "orientation"),
        ({"input_shape": [8, 8, 8], "output": "softmax"}, "output"),
        ({"input_shape": [8, 8, 8], "output": "class"}, "class_index"),
        ({"input_shape": [8, 8, 8], "output": "regression", "class_index": 0}, "class_index"),
        ({"input_shape": [8, 8, 8], "mean": 1}, "unknown key"),
    ],
)
def test_contract_errors_name_the_key(tmp_path, values, named):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    if named is None:
        read_contract(path)
        return
    with pytest.raises(CounterwarpError) as caught:
        read_contract(path)
    message = str(caught.value)
    assert str(path) in message and named in message and "\n" not in message


def test_contract_file_not_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{input_shape: 8")
    with pytest.raises(CounterwarpError, match="not a readable JSON contract"):
        read_contract(path)


def test_intensity_normalisations():
    values = np.array([[[0.0, 2.0], [4.0, 6.0]]], dtype=np.float32)
    assert np.allclose(normalise_intensity(values, "none"), values)
    assert np.allclose(normalise_intensity(values, "minmax"), values / 6.0)
    assert np.allclose(normalise_intensity(values, (2.0, 4.0)), (values - 2.0) / 4.0)
    zscored = normalise_intensity(values, "zscore-brain")
    brain = values != 0
    assert zscored[~brain] == 0 and abs(zscored[brain].mean()) < 1e-6
    assert abs(zscored[brain].std() - 1) < 1e-5


# ------------------------------------------------------------------------------- adapter


def test_class_score_is_log_odds_against_the_rest():
    logits = torch.tensor([[0.5, 1.0, -2.0], [3.0, 0.0, 1.0]])
    score = select_score(logits, 2, "class", 2)
    rest = torch.logsumexp(logits[:, :2], dim=1)
    assert torch.allclose(score, logits[:, 2] - rest)
    # log-odds of the softmax probability: log(p / (1 - p))
    p = torch.softmax(logits, dim=1)[:, 2]
    assert torch.allclose(score, torch.log(p / (1 - p)), atol=1e-6)
    assert torch.equal(select_score(logits, 2, "logit", 1), logits[:, 1])
    assert torch.equal(select_score(logits[:, :1], 2, "regression", None), logits[:, 0])


@pytest.mark.parametrize(
    ("shape", "output", "index", "says"),
    [((2, 3), "logit", None, "class_index"), ((2, 1), "class", 0, "2 or more"),
     ((2, 3), "class", 3, "0..2"), ((2, 3, 4), "logit", None, "(2, 3, 4)"),
     ((3,), "logit", None, "batch of 2")],
)
def test_wrong_output_shapes_are_refused(shape, output, index, says):
    with pytest.raises(CounterwarpError) as caught:
        select_score(torch.zeros(shape), 2, output, index)
    assert says in str(caught.value)


def test_channels_are_repeated():
    model = MeanModel(channels=3)
    adapted = ContractClassifier(model, channels=3)
    images = torch.rand(2, 1, *SHAPE)
    expected = model(images.repeat(1, 3, 1, 1, 1))[:, 0]
    assert torch.allclose(adapted(images), expected)


# -------------------------------------------------------------------- boundary checks


class Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0]) + 0 * x.sum()


class NotFinite(MeanModel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 0.0


class WithDropout(MeanModel):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(x.flatten(2)).mean(dim=2))


class WithBatchNorm(MeanModel):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm3d(1)
        nn.init.ones_(self.linear.weight)  # a drawn weight near 0 would hide the batch's effect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(x) + x)


@pytest.mark.parametrize(
    ("model", "says"),
    [(Constant(), "does not depend on its input"), (NotFinite(), "non-finite"),
     (WithDropout().train(), "training mode"), (WithBatchNorm().train(), "training mode"),
     (MeanModel(outputs=4), "class_index")],
)
def test_bad_models_are_refused_before_any_output(model, says):
    with pytest.raises(CounterwarpError) as caught:
        check_classifier(ContractClassifier(model), SHAPE, "model.ts")
    message = str(caught.value)
    assert message.startswith("model.ts: ") and says in message and "\n" not in message


def test_a_model_that_fails_on_the_contract_shape_says_so():
    with pytest.raises(CounterwarpError, match="check input_shape and channels"):
        check_classifier(ContractClassifier(MeanModel(channels=2)), SHAPE, "m")


def test_good_model_passes_in_eval_mode():
    check_classifier(ContractClassifier(WithDropout().eval()), SHAPE, "m")


# ----------------------------------------------------------------------------- loaders


def test_torchscript_export_and_factory_give_the_same_scores(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = MeanModel().eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "m.ts")
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.rand(2, 1, *SHAPE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "m.pt2")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "user_models.py").write_text(
        "from torch import nn\n\n\nclass M(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.linear = nn.Linear(1, 1)\n\n"
        "    def forward(self, x):\n        return self.linear(x.mean(dim=(2, 3, 4)))\n\n\n"
        "def build():\n    return M()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    contract = _contract(tmp_path)
    images = torch.rand(3, 1, *SHAPE)
    expected = model(images)[:, 0]
    kinds = {}
    for spec, weights in (("m.ts", None), ("m.pt2", None), ("user_models:build", "weights.pt")):
        given = spec if ":" in spec else str(tmp_path / spec)
        source = classifier_source(given, None if weights is None else tmp_path / weights,
                                   contract)
        adapted, payload = load_source(source)
        kinds[spec] = payload["classifier"]["kind"]
        assert torch.allclose(adapted(images), expected, atol=1e-6)
        assert not any(p.requires_grad for p in adapted.parameters())
    assert kinds == {"m.ts": "torchscript", "m.pt2": "export", "user_models:build": "factory"}
    sys.modules.pop("user_models", None)


def test_pickled_model_and_bare_state_dict_are_refused_unread(tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"weight": torch.ones(2)}, tmp_path / "state.pt")
    with pytest.raises(CounterwarpError, match="never unpickles"):
        source_kind(str(tmp_path / "state.pt"))
    # a pickle that would run code if loaded: refused by its archive layout, never executed
    torch.save(_Exploit(str(marker)), tmp_path / "model.pt")
    with pytest.raises(CounterwarpError, match="never unpickles"):
        source_kind(str(tmp_path / "model.pt"))
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def test_spec_errors(tmp_path):
    contract = _contract(tmp_path)
    with pytest.raises(CounterwarpError, match="no such file, and not package.module:factory"):
        classifier_source(str(tmp_path / "missing.ts"), None, contract)
    with pytest.raises(CounterwarpError, match="needs --weights"):
        classifier_source("os.path:join", None, contract)
    with pytest.raises(CounterwarpError, match="needs --contract"):
        classifier_source("os.path:join", tmp_path / "w.pt", None)
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pt")
    source = classifier_source("counterwarp_no_such_module:build", tmp_path / "w.pt", contract)
    with pytest.raises(CounterwarpError, match="cannot import counterwarp_no_such_module"):
        load_source(source)
    source = classifier_source("math:sqrt", tmp_path / "w.pt", contract)
    with pytest.raises(CounterwarpError, match="with no arguments"):
        load_source(source)
    source = classifier_source("math:pi", tmp_path / "w.pt", contract)
    with pytest.raises(CounterwarpError, match="no callable pi"):
        load_source(source)
    source = classifier_source("builtins:object", tmp_path / "w.pt", contract)
    with pytest.raises(CounterwarpError, match="not a torch.nn.Module"):
        load_source(source)


def test_torchscript_saved_in_training_mode_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(WithDropout().train()), tmp_path / "m.ts")
    source = classifier_source(str(tmp_path / "m.ts"), None, _contract(tmp_path))
    with pytest.raises(CounterwarpError, match=r"training mode.*model.eval\(\)"):
        load_source(source)


def test_factory_weights_that_do_not_fit(tmp_path, monkeypatch):
    (tmp_path / "user_models2.py").write_text(
        "from torch import nn\n\n\ndef build():\n    return nn.Linear(3, 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(nn.Linear(5, 1).state_dict(), tmp_path / "w.pt")
    source = classifier_source("user_models2:build", tmp_path / "w.pt", _contract(tmp_path))
    with pytest.raises(CounterwarpError, match="does not fit user_models2:build"):
        load_source(source)
    sys.modules.pop("user_models2", None)
