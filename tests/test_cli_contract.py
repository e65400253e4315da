"""The command line's contract: help and a shown default for every option, an example per
command that parses, ``--version``, and fit options generated from the one home of the
defaults (:class:`counterwarp.train.config.FitConfig`)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shlex

import pytest

import counterwarp
from counterwarp.cli import EXAMPLES, _fit_settings, build_parser, main
from counterwarp.explain.simulator import Simulator
from counterwarp.nn.simulator import SimulatorNet
from counterwarp.train.config import SETTING_HELP, FitConfig


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_an_example_that_parses():
    commands = _subparsers()
    assert set(commands) == set(EXAMPLES)
    for name, sub in commands.items():
        assert EXAMPLES[name] in sub.format_help()
        words = shlex.split(EXAMPLES[name])
        assert words[:2] == ["counterwarp", name]
        args = build_parser().parse_args(words[1:])
        assert args.command == name


def test_every_option_has_help_and_shows_its_default():
    for name, sub in _subparsers().items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help text"
            optional = action.option_strings and not action.required
            if optional and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text or "default" in action.help, (
                    f"{name} {action.option_strings[0]}: default {action.default!r} not shown"
                )


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"counterwarp {counterwarp.__version__}"


def test_fit_options_are_fitconfig_fields_with_its_defaults_shown():
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    assert set(SETTING_HELP) <= fields
    defaults = FitConfig()
    fit = " ".join(_subparsers()["fit"].format_help().split())
    for name in SETTING_HELP:
        default = getattr(defaults, name)
        if default is not None:
            assert f"(default: {default})" in fit, name
    args = build_parser().parse_args(["fit", "--manifest", "m.csv", "--run", "r", "--steps", "7",
                                      "--margin", "0.5"])
    assert _fit_settings(args) == {"steps": 7, "margin": 0.5}


def test_simulator_keywords_are_fitconfig_fields_with_its_defaults():
    parameters = inspect.signature(Simulator.__init__).parameters
    keywords = {
        name: p.default for name, p in parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert keywords == dataclasses.asdict(FitConfig()) | {"channels": FitConfig().channels}


def test_network_settings_of_fitconfig_are_the_networks_defaults():
    net = inspect.signature(SimulatorNet.__init__).parameters
    config = FitConfig()
    for name in ("field", "num_experts", "routing", "channels", "latent_dim", "norm"):
        assert getattr(config, name) == net[name].default, name
    # the two product defaults that differ from the paper's network on purpose
    assert config.antisymmetric is True and net["antisymmetric"].default is False
    assert config.field_sigma == 1.0 and net["smoothing_sigma"].default == 0.0
