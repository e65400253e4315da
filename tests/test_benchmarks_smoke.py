"""Smoke tests of ``benchmarks/``: the loop baseline is exact, and ``run.py --quick`` works.

No timing is asserted anywhere: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from counterwarp.nn.condconv import CondConv
from counterwarp.nn.simulator import SimulatorNet

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from loop_condconv import (  # noqa: E402
    BoundCondConv,
    LoopCondConv,
    bound_simulator,
    condconv_impls,
    loop_simulator,
    with_impl,
)


def _net_with_live_head(seed: int = 0) -> SimulatorNet:
    """A tiny SimulatorNet whose zero-initialised head is made non-zero (so outputs differ)."""
    torch.manual_seed(seed)
    net = SimulatorNet((16, 16, 16), channels=(4, 8, 8, 8))
    torch.nn.init.normal_(net.head.weight, std=0.05)
    torch.nn.init.normal_(net.head.bias, std=0.05)
    return net


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 16, 16, 16, generator=generator), torch.tensor([1.0, -1.0, 1.0])


def test_loop_simulator_swaps_every_condconv_and_keeps_the_original() -> None:
    net = _net_with_live_head()
    loop = loop_simulator(net)
    layers = [m for m in loop.modules() if isinstance(m, CondConv)]
    assert layers and all(isinstance(m, LoopCondConv) for m in layers)
    assert not any(isinstance(m, LoopCondConv) for m in net.modules())
    assert set(condconv_impls(loop)) == {"loop"}
    for (name, p), (name_loop, p_loop) in zip(
        net.named_parameters(), loop.named_parameters(), strict=True
    ):
        assert name == name_loop
        assert p.data_ptr() != p_loop.data_ptr()
        torch.testing.assert_close(p, p_loop, rtol=0, atol=0)


def test_bound_layers_are_one_plain_convolution_with_the_first_expert() -> None:
    net = _net_with_live_head()
    bound = bound_simulator(net)
    assert set(condconv_impls(bound)) == {"bound"}
    layer = bound.head
    assert isinstance(layer, BoundCondConv)
    x = torch.randn(2, layer.in_channels, 16, 16, 16)
    expected = torch.nn.functional.conv3d(x, layer.weight[0], layer.bias[0], padding=1)
    # the condition is ignored: one ordinary convolution, no routing
    for condition in (torch.ones(2), -torch.ones(2)):
        torch.testing.assert_close(layer(x, condition), expected)
    assert not torch.allclose(net.head(x, torch.ones(2)), expected, atol=1e-4)


@pytest.mark.parametrize("impl", ["auto", "grouped", "experts"])
def test_loop_baseline_equals_vectorised_forward_and_gradient(impl: str) -> None:
    net = with_impl(_net_with_live_head(), impl)
    loop = loop_simulator(net)
    x, condition = _inputs()
    # eval: BatchNorm running statistics and no routing dropout, so both are deterministic
    net.eval()
    loop.eval()
    torch.testing.assert_close(loop(x, condition), net(x, condition), rtol=1e-5, atol=1e-5)

    # train mode (batch statistics, dropout): same seed -> same dropout masks in both
    net.train()
    loop.train()
    grads = []
    for model in (net, loop):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        out = model(xi, condition)
        (out**2).mean().backward()
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (out_v, gx_v, gp_v), (out_l, gx_l, gp_l) = grads
    torch.testing.assert_close(out_l, out_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_l, gx_v, rtol=1e-5, atol=1e-5)
    assert gp_v.keys() == gp_l.keys()
    for name in gp_v:
        torch.testing.assert_close(gp_l[name], gp_v[name], rtol=1e-4, atol=1e-5, msg=name)


def test_with_impl_rejects_unknown_impl() -> None:
    with pytest.raises(ValueError, match="impl"):
        with_impl(_net_with_live_head(), "loop")


def test_quick_run_writes_results(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "run.py"),
            "--quick",
            "--out",
            str(tmp_path),
            "--machine",
            "smoke",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| kind | size | batch | variant |" in done.stdout
    report = json.loads((tmp_path / "smoke-quick.json").read_text())
    assert (tmp_path / "smoke-quick.md").is_file()
    assert report["schema"] == "counterwarp.bench/1"
    for key in ("created", "machine", "settings", "reference", "cases", "speedups", "warnings"):
        assert key in report, key
    for key in ("cpu_model", "cores_logical", "cores_available", "torch", "hostname", "device"):
        assert key in report["machine"], key
    cases = {case["name"]: case for case in report["cases"]}
    expected = {
        f"{kind} 16^3 b{batch} {impl}"
        for kind, batch in (("train", 2), ("explain", 1))
        for impl in ("auto", "grouped", "experts", "loop")
    }
    assert expected <= cases.keys()
    assert any(c["kind"] == "conv3d" for c in report["reference"])
    for case in report["cases"]:
        assert case["error"] is None, (case["name"], case["error"])
        for key in (
            "median_s",
            "times_s",
            "volumes_per_s",
            "peak_memory_mib",
            "flops",
            "gflops_per_s",
            "threads",
        ):
            assert key in case, (case["name"], key)
        assert case["threads"] == 1
        assert case["flops"] > 0
    for name in expected - {"train 16^3 b2 loop", "explain 16^3 b1 loop"}:
        assert name in report["speedups"]
        assert cases[name]["speedup_vs_loop"] > 0

    # the loop baseline does the minimal convolution work; grouped does exactly the same
    # (checks the corrected FLOP formula for grouped convolution backward)
    def conv_flops(name: str) -> int:
        by_op = cases[name]["flops_by_op"]
        return sum(n for op, n in by_op.items() if "convolution" in op)

    assert conv_flops("train 16^3 b2 grouped") == conv_flops("train 16^3 b2 loop")
    # the bound does one ordinary convolution per layer: the same convolution work as the loop
    assert conv_flops("train 16^3 b2 bound") == conv_flops("train 16^3 b2 loop")
    assert "train 16^3 b2 auto+bf16" in cases
    # the paper's configuration is measured in the same run, and every case against it
    for kind, batch in (("train", 2), ("explain", 1)):
        assert f"{kind} 16^3 b{batch} paper" in cases
        assert cases[f"{kind} 16^3 b{batch} auto"]["speedup_vs_paper"] > 0
        assert cases[f"{kind} 16^3 b{batch} auto"]["roofline_s"] > 0
    # the field at half resolution leaves out the full-size decoder level and head
    assert cases["train 16^3 b2 auto+half"]["flops"] < cases["train 16^3 b2 auto"]["flops"]


def test_time_to_quality_scores_each_fit_over_training_time(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "time_to_quality.py"), "--out", str(tmp_path),
         "--n", "24", "--shape", "16", "16", "16", "--epochs", "1", "--steps", "6",
         "--budget-s", "60", "--eval-every", "0", "--variants", "full,half+bf16",
         "--seeds", "0", "--batch-size", "4"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "time_to_quality.json").read_text())
    curves = {curve["variant"]: curve for curve in report["curves"]}
    assert set(curves) == {"full", "half+bf16"}
    assert curves["half+bf16"]["config"]["field_downsize"] == 2
    for curve in curves.values():
        points = curve["points"]
        assert [p["step"] for p in points] == list(range(1, 7))  # scored after every step
        times = [p["train_s"] for p in points]
        assert times == sorted(times) and times[0] > 0
        for point in points:
            assert -1 <= point["region"] <= 1
            for moved in (point["moved_inject"], point["moved_remove"]):  # nan: nobody to move
                assert math.isnan(moved) or 0 <= moved <= 1
    assert "| full | 0 |" in (tmp_path / "time_to_quality.md").read_text()
