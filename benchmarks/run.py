#!/usr/bin/env python
"""Speed and memory benchmarks of counterwarp's simulator (``make bench``).

What is measured, per case (see ``docs/performance.md`` for how to read the numbers):

- ``train``: one simulator training step exactly as ``counterwarp fit`` takes it
  (``train.simulator._LossTerms`` + ``_train_step``, joint schedule, Adam): forward in both
  directions (half the batch inject, half remove), the warp, the logit shift through a frozen
  :class:`~counterwarp.nn.classifier.Classifier`, the cycle pass, smoothness and magnitude
  terms, backward, optimiser step.
- ``explain``: ``Simulator.explain`` on one volume, both directions (each with its log
  volume change), i.e. the latency of explaining one subject.
- ``conv3d``: a plain large ``conv3d`` (forward + backward), the machine's reference rate.

for each CondConv implementation: ``auto`` (the product default), ``grouped``, ``experts``
and ``loop`` (the per-sample loop of the paper's code, ``benchmarks/loop_condconv.py``),
plus optional variants of ``auto`` or others (channels-last 3D, ``torch.compile``, bf16 autocast,
inference mode for explain).

On CPU every case runs in its own Python subprocess, so its peak memory can be read from
``getrusage`` (the growth of the max RSS over the set-up); on CUDA the cases share one
process and ``torch.cuda.max_memory_allocated`` is reset per case (compiled cases always
run alone). FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one
extra step, with a corrected formula for grouped-convolution backward.

Results: ``<out>/<machine>.json`` and a markdown table (printed and ``<out>/<machine>.md``).

Examples::

    python benchmarks/run.py                         # full CPU run (sizes 64:4,32:8)
    python benchmarks/run.py --quick                 # tiny smoke run, under a minute
    python benchmarks/run.py --device cuda --bf16 --compile
    OMP_NUM_THREADS=1 python benchmarks/run.py --sizes 32:8 --impls auto,loop --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:  # a checkout without `pip install -e .` still works
    import counterwarp  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

SCHEMA = "counterwarp.bench/1"
IMPLS = ("paper", "auto", "grouped", "experts", "loop", "bound")
VARIANTS = ("channels_last", "inference_mode", "compile", "bf16", "half")
DEFAULT_VARIANTS = ("channels_last", "inference_mode", "bf16", "half")
#: The paper's configuration (`paper`): its conditional network with the field head at full
#: resolution, no field smoothing, the per-sample CondConv loop, float32.
PAPER_SETTINGS = {"field_downsize": 1, "antisymmetric": False, "field_sigma": 0.0}
DEFAULT_SIZES = "64:4,32:8"
QUICK_SIZES = "16:2"
#: the reference convolution: (channels, edge, batch); quick mode uses a small one
CONV_REFERENCE = (32, 64, 2)
CONV_REFERENCE_QUICK = (8, 16, 1)
MARGIN = 1.0
MIB = 2**20


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One measurement: what to run, at which size, with which implementation and options.

    Attributes:
        kind: ``"train"``, ``"explain"`` or ``"conv3d"``.
        shape: spatial shape ``S`` of the images (``conv3d``: of the feature map).
        batch: batch size (``explain``: always 1).
        impl: CondConv implementation, one of :data:`IMPLS` (``conv3d``: ``"reference"``).
        options: subset of :data:`VARIANTS` applied to this case.
        channels: channels of the ``conv3d`` reference (0 otherwise).
    """

    kind: str
    shape: tuple[int, ...]
    batch: int
    impl: str
    options: tuple[str, ...] = ()
    channels: int = 0

    @property
    def variant(self) -> str:
        """``impl`` plus its options, e.g. ``"auto+compile+bf16"``."""
        return "+".join((self.impl, *self.options))

    @property
    def size(self) -> str:
        """``"64^3"`` for cubes, ``"64x48x32"`` otherwise."""
        if len(set(self.shape)) == 1:
            return f"{self.shape[0]}^{len(self.shape)}"
        return "x".join(map(str, self.shape))

    @property
    def name(self) -> str:
        """Unique, human-readable case name, e.g. ``"train 64^3 b4 auto"``."""
        return f"{self.kind} {self.size} b{self.batch} {self.variant}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape), "options": list(self.options)}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Case:
        return cls(
            kind=payload["kind"],
            shape=tuple(payload["shape"]),
            batch=int(payload["batch"]),
            impl=payload["impl"],
            options=tuple(payload["options"]),
            channels=int(payload.get("channels", 0)),
        )


def parse_sizes(text: str) -> list[tuple[tuple[int, ...], int]]:
    """Parse ``"64:4,32:8"`` (edge:batch, cubes) or ``"64x64x48:2,128x128:16"``.

    Returns:
        ``[(spatial shape, batch), ...]``.
    """
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(\d+(?:x\d+){0,2}):(\d+)", item)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"bad size {item!r}: use EDGE:BATCH (a cube, e.g. 64:4) or DxHxW:BATCH / HxW:BATCH"
            )
        edges = tuple(int(n) for n in match.group(1).split("x"))
        shape = edges * 3 if len(edges) == 1 else edges
        batch = int(match.group(2))
        if batch < 1 or min(shape) < 4:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: batch >= 1, edges >= 4")
        sizes.append((shape, batch))
    return sizes


def build_cases(
    sizes: list[tuple[tuple[int, ...], int]],
    impls: tuple[str, ...],
    variants: tuple[str, ...],
    conv_reference: tuple[int, int, int],
    explain: bool = True,
    variant_impls: tuple[str, ...] = ("auto",),
) -> list[Case]:
    """Every case of one run, reference convolution first.

    Variants apply to the implementations in ``variant_impls`` (default ``auto``, the
    product's) that are also in ``impls``; ``compile`` and ``bf16`` together add one more
    case with both. ``inference_mode`` only concerns ``explain``.
    """
    channels, edge, batch = conv_reference
    cases = [Case("conv3d", (edge,) * 3, batch, "reference", (), channels)]
    if "bf16" in variants:
        cases.append(Case("conv3d", (edge,) * 3, batch, "reference", ("bf16",), channels))

    def option_sets(kind: str) -> list[tuple[str, ...]]:
        sets = [
            (v,) for v in VARIANTS if v in variants and (v != "inference_mode" or kind == "explain")
        ]
        if "compile" in variants and "bf16" in variants:
            sets.append(("compile", "bf16"))
        if "half" in variants and "bf16" in variants:
            sets.append(("half", "bf16"))
        return sets

    varied = [impl for impl in impls if impl in variant_impls]
    for shape, b in sizes:
        cases += [Case("train", shape, b, impl) for impl in impls]
        for impl in varied:
            cases += [Case("train", shape, b, impl, opts) for opts in option_sets("train")]
    if explain:
        for shape in dict.fromkeys(shape for shape, _ in sizes):
            cases += [Case("explain", shape, 1, impl) for impl in impls]
            for impl in varied:
                cases += [Case("explain", shape, 1, impl, o) for o in option_sets("explain")]
    return cases


# --------------------------------------------------------------------------- machine


def slug(text: str) -> str:
    """Lower-case, file-name-safe name: ``"Intel(R) Xeon(R) CPU"`` -> ``"intel-xeon-cpu"``."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def _cpuinfo() -> tuple[str, int | None]:
    """CPU model name and number of physical cores (None if unknown)."""
    model, cores = "", set()
    physical = core = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "model name" and not model:
                model = value
            elif key == "physical id":
                physical = value
            elif key == "core id":
                core = value
                cores.add((physical, core))
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown-cpu", (
        len(cores) or None
    )


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AMX or AVX512-BF16 in /proc/cpuinfo).

    Without it, oneDNN emulates bf16 and autocast is usually slower than float32.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _memory_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(device: str) -> dict[str, Any]:
    """Describe the machine (CPU, cores, memory, GPU, library versions, load)."""
    import torch

    model, physical = _cpuinfo()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": model,
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "cores_available": available,
        "memory_gib": _memory_total_gib(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": device,
        "gpu": None,
        "load_average_start": _loadavg(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency
        info["monai"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """Default results name: CPU model and usable cores, or the GPU's name on CUDA."""
    if info.get("gpu"):
        return slug(info["gpu"]["name"])
    return f"{slug(info['cpu_model'])}-{info['cores_available']}c"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- worker side


def _maxrss_bytes() -> int:
    """This process's peak resident set size in bytes (``getrusage``)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _Memory:
    """Peak memory of what runs between :meth:`start` and :meth:`peak_bytes`."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            self.base = _maxrss_bytes()

    def peak_bytes(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return _maxrss_bytes() - self.base

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated minus allocated before the first step"
        return "getrusage max RSS growth over the set-up (model, data, optimiser)"


def _reset_warp_caches() -> None:
    """Drop counterwarp's cached warp layers, so no case inherits another's reference grid."""
    from counterwarp.geometry import warp as warp_module

    for name in ("_WARPS", "_INTEGRATORS"):
        cache = getattr(warp_module, name, None)
        if isinstance(cache, dict):
            cache.clear()


def _make_simulator(case: Case, device: Any) -> Any:
    """The SimulatorNet of a case, on ``device``, with the case's CondConv implementation."""
    import torch
    from loop_condconv import bound_simulator, loop_simulator, with_impl

    from counterwarp.train.simulator import build_net

    torch.manual_seed(0)
    net = build_net(_fit_config(case), case.shape)  # the network `counterwarp fit` trains
    if case.impl in ("loop", "paper"):
        net = loop_simulator(net)
    elif case.impl == "bound":
        net = bound_simulator(net)
    else:
        net = with_impl(net, case.impl)
    return net.to(device)


def _fit_config(case: Case) -> Any:
    """The FitConfig a case trains with: the product's defaults, the paper's settings for
    ``paper``, the field at half resolution for ``half``, bf16 for ``bf16``."""
    from counterwarp.train.config import FitConfig

    settings: dict[str, Any] = {"batch_size": case.batch}
    if case.impl == "paper":
        return FitConfig(**settings, **PAPER_SETTINGS)
    if "half" in case.options:
        settings["field_downsize"] = 2
    if "bf16" in case.options:
        settings["precision"] = "bf16"
    return FitConfig(**settings)


def _memory_format(case: Case) -> Any:
    import torch

    if "channels_last" not in case.options:
        return None
    return torch.channels_last_3d if len(case.shape) == 3 else torch.channels_last


def _autocast(case: Case, device: Any) -> contextlib.AbstractContextManager[Any]:
    import torch

    if "bf16" in case.options:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _setup_train(case: Case, device: Any) -> Callable[[], None]:
    """Build net, frozen classifier, data and optimiser; return one training step."""
    import torch

    from counterwarp.nn.classifier import Classifier, classifier_logits, freeze
    from counterwarp.train.simulator import to_training_layout
    from counterwarp.train.steps import LossTerms, train_step

    # joint schedule, the product's default; bf16 through fit's own precision setting
    config = _fit_config(case)
    net = _make_simulator(case, device)
    torch.manual_seed(1)
    classifier = freeze(Classifier(case.shape)).to(device)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(case.batch, 1, *case.shape, generator=generator).to(device)
    fmt = _memory_format(case)
    if fmt is not None:
        net = net.to(memory_format=fmt)
        classifier = classifier.to(memory_format=fmt)
        images = images.contiguous(memory_format=fmt)
    # the layout `fit` itself trains in (channels-last for 3D bf16), as fit_simulator does
    net = to_training_layout(net, config, len(case.shape))
    classifier = to_training_layout(classifier, config, len(case.shape))
    # both directions in every batch, as fit_simulator's balanced batches
    condition = torch.where(torch.arange(case.batch) % 2 == 0, 1.0, -1.0).to(device)
    with torch.no_grad():
        logit_before = classifier_logits(classifier, images).float()
    if "compile" in case.options:
        net.compile()
        classifier.compile()
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    terms = LossTerms(net, classifier, config, MARGIN)
    net.train()
    counter = iter(range(10**9))

    def step() -> None:
        train_step(terms, config, optimiser, None, images, condition, logit_before, next(counter))

    return step


def _setup_explain(case: Case, device: Any) -> Callable[[], None]:
    """Build a ready simulator; return 'explain one volume in both directions'.

    The image is handed over on the CPU, as the CLI does; ``explain`` moves it to the
    simulator's device and returns CPU tensors, so transfers are part of the latency.
    """
    import torch

    from counterwarp.explain.simulator import Simulator
    from counterwarp.nn.classifier import Classifier, freeze

    net = _make_simulator(case, device)
    torch.manual_seed(1)
    classifier = freeze(Classifier(case.shape)).to(device)
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(1, 1, *case.shape, generator=generator)
    fmt = _memory_format(case)
    if fmt is not None:
        net = net.to(memory_format=fmt)
        classifier = classifier.to(memory_format=fmt)
        image = image.contiguous(memory_format=fmt)
    net.eval()
    if "compile" in case.options:
        net.compile()
        classifier.compile()
    simulator = Simulator()
    simulator.net_, simulator.classifier_, simulator.margin_ = net, classifier, MARGIN
    mode = torch.inference_mode if "inference_mode" in case.options else contextlib.nullcontext

    def explain_both() -> None:
        with mode(), _autocast(case, device):
            if case.impl == "paper":  # the paper's code: one call per direction
                for direction in ("inject", "remove"):
                    simulator.explain(image, direction)
            else:
                simulator.explain_directions(image, ("inject", "remove"))

    return explain_both


def _setup_conv(case: Case, device: Any) -> Callable[[], None]:
    """A plain ``conv3d`` C -> C, k = 3, forward + backward (input and weight gradients)."""
    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(case.channels, case.channels, 3, padding=1).to(device)
    x = torch.randn(case.batch, case.channels, *case.shape, device=device, requires_grad=True)

    def step() -> None:
        with _autocast(case, device):
            y = conv(x)
        y.float().sum().backward()
        conv.zero_grad(set_to_none=True)
        x.grad = None

    return step


SETUPS: dict[str, Callable[[Case, Any], Callable[[], None]]] = {
    "train": _setup_train,
    "explain": _setup_explain,
    "conv3d": _setup_conv,
}


def _conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """FLOPs of ``aten.convolution_backward``, correct for grouped convolutions.

    Each requested gradient (input, weight) costs as much as the forward convolution.
    ``torch.utils.flop_counter``'s own formula counts the weight gradient of a grouped
    convolution ``groups`` times over (it treats ``(1, B * C_in, *S)`` as ``B * C_in``
    samples of one channel against all ``B * C_out`` output channels), which would credit
    the grouped CondConv with ``B`` times its real weight-gradient work.
    """
    from torch.utils.flop_counter import conv_flop_count

    transposed, output_mask = args[4], args[7]
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _count_flops(fn: Callable[[], None]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``fn`` (total, and per aten op) by ``FlopCounterMode``.

    Matrix products and convolutions only (2 per multiply-add); element-wise work, the
    warp's grid sampling and normalisation are not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def _profile(fn: Callable[[], None], device: Any, path: Path) -> None:
    """Write a ``torch.profiler`` table of one call of ``fn`` to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=30))


def run_case(case: Case, spec: dict[str, Any]) -> dict[str, Any]:
    """Set up and measure one case in this process; never raises (errors are recorded)."""
    import torch

    device = torch.device(spec["device"])
    result: dict[str, Any] = {**case.to_json(), "name": case.name, "variant": case.variant}
    memory = _Memory(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        _reset_warp_caches()
        started = time.perf_counter()
        fn = SETUPS[case.kind](case, device)
        result["setup_s"] = round(time.perf_counter() - started, 3)
        if case.kind != "conv3d":
            from loop_condconv import condconv_impls

            net = _find_net(fn)
            result["condconv_impls"] = condconv_impls(net) if net is not None else None
        memory.start()
        warmup = spec["warmup"] + (2 if "compile" in case.options else 0)
        started = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync()
        result["warmup_s"] = round(time.perf_counter() - started, 3)
        times = []
        for _ in range(spec["repeats"]):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        result["peak_memory_mib"] = round(memory.peak_bytes() / MIB, 1)
        if device.type == "cpu":
            result["peak_rss_mib"] = round(_maxrss_bytes() / MIB, 1)
        result["memory_method"] = memory.method
        median = statistics.median(times)
        volumes = case.batch if case.kind != "explain" else 1
        result.update(
            times_s=[round(t, 6) for t in times],
            median_s=round(median, 6),
            min_s=round(min(times), 6),
            volumes_per_s=round(volumes / median, 4),
        )
        if "compile" in case.options:
            result["flops"] = None  # counted on the eager twin (see summarise)
        else:
            flops, by_op = _count_flops(fn)
            result.update(
                flops=flops,
                flops_by_op=by_op,
                gflops_per_s=round(flops / median / 1e9, 3),
            )
        if spec.get("profile_dir"):
            _profile(fn, device, Path(spec["profile_dir"]) / f"{slug(case.name)}.txt")
        result["error"] = None
    except Exception as error:  # noqa: BLE001 - one failing case must not end the run
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc(limit=8)
    result["threads"] = torch.get_num_threads()
    return result


def _find_net(fn: Callable[[], None]) -> Any:
    """The simulator network captured by a step closure (for reporting its CondConv impls)."""
    from counterwarp.nn.simulator import SimulatorNet

    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        for candidate in (value, getattr(value, "net", None), getattr(value, "net_", None)):
            if isinstance(candidate, SimulatorNet):
                return candidate
    return None


def worker(spec_path: str, result_path: str) -> int:
    """Entry point of a case subprocess: read the spec, run its cases, write the results."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    results = []
    for payload in spec["cases"]:
        results.append(run_case(Case.from_json(payload), spec))
        Path(result_path).write_text(json.dumps(results))  # partial results survive a kill
    return 0


# --------------------------------------------------------------------------- main side


def run_group(
    cases: list[Case], spec: dict[str, Any], timeout: float, env: dict[str, str]
) -> list[dict[str, Any]]:
    """Run ``cases`` in one fresh subprocess; failed or missing cases carry an ``error``."""
    with tempfile.TemporaryDirectory(prefix="counterwarp-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "cases": [c.to_json() for c in cases]}))
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(spec_path),
            str(result_path),
        ]
        failure = None
        try:
            done = subprocess.run(
                command, env=env, timeout=timeout, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                failure = f"worker exited {done.returncode}: " + " | ".join(tail)
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout:.0f} s (raise --case-timeout)"
        results = json.loads(result_path.read_text()) if result_path.exists() else []
    for case in cases[len(results) :]:
        results.append(
            {
                **case.to_json(),
                "name": case.name,
                "variant": case.variant,
                "error": failure or "no result",
            }
        )
    return results


def group_cases(cases: list[Case], isolate: str, quick: bool, device: str) -> list[list[Case]]:
    """Split ``cases`` into the groups that share one subprocess.

    CPU peak memory (max RSS) is only per case with one process per case, so that is the
    default on CPU. On CUDA the peak is reset per case and one process saves the start-up
    of each case. Compiled cases always run alone: a fresh process keeps ``torch.compile``
    from hitting its recompilation limit and silently falling back to eager.
    """
    if isolate == "auto":
        isolate = "none" if quick or device.startswith("cuda") else "case"
    if isolate == "case":
        return [[case] for case in cases]
    shared = [case for case in cases if "compile" not in case.options]
    alone = [[case] for case in cases if "compile" in case.options]
    return ([shared] if shared else []) + alone


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Add speed-ups vs the loop baseline and FLOP rates; return the ``speedups`` table.

    - ``speedup_vs_loop``: loop median time / this case's median time, same kind and size;
    - ``flops`` of a compiled case: taken from its eager twin (same impl, other options);
    - ``useful_gflops_per_s``: the loop baseline's FLOPs (the minimal work: one mixed
      kernel per sample) divided by this case's time; ``experts`` counts E x the work of
      its narrow layers in ``gflops_per_s`` but not here;
    - ``fraction_of_conv3d``: ``gflops_per_s`` over the reference conv3d's rate in the same
      precision.
    """
    ok = [r for r in results if not r.get("error")]

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["kind"], tuple(r["shape"]), r["batch"])

    loops = {key(r): r for r in ok if r["impl"] == "loop" and not r["options"]}
    papers = {key(r): r for r in ok if r["impl"] == "paper" and not r["options"]}
    eager = {
        (key(r), r["impl"], "bf16" in r["options"]): r
        for r in ok
        if "compile" not in r["options"] and r.get("flops")
    }
    convs = {"bf16" in r["options"]: r for r in ok if r["kind"] == "conv3d"}
    speedups: dict[str, float] = {}
    for r in ok:
        if r.get("flops") is None:
            twin = eager.get((key(r), r["impl"], "bf16" in r["options"])) or eager.get(
                (key(r), r["impl"], False)
            )
            if twin is not None:
                r["flops"] = twin["flops"]
                r["flops_from"] = twin["name"]
                r["gflops_per_s"] = round(r["flops"] / r["median_s"] / 1e9, 3)
        loop = loops.get(key(r))
        if loop is not None and r["kind"] != "conv3d":
            r["speedup_vs_loop"] = round(loop["median_s"] / r["median_s"], 3)
            if loop.get("flops"):
                r["useful_gflops_per_s"] = round(loop["flops"] / r["median_s"] / 1e9, 3)
            if r is not loop:
                speedups[r["name"]] = r["speedup_vs_loop"]
        paper = papers.get(key(r))
        if paper is not None and r["kind"] != "conv3d":
            r["speedup_vs_paper"] = round(paper["median_s"] / r["median_s"], 3)
        conv = convs.get("bf16" in r["options"])
        if conv is not None and r.get("gflops_per_s") and conv.get("gflops_per_s"):
            r["fraction_of_conv3d"] = round(r["gflops_per_s"] / conv["gflops_per_s"], 4)
            # roofline: the time the counted FLOPs take at the plain conv3d's rate
            r["roofline_s"] = round(r["flops"] / (conv["gflops_per_s"] * 1e9), 4)
    return speedups


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table, with a one-line machine description above it."""
    m = report["machine"]
    gpu = f", GPU {m['gpu']['name']}" if m.get("gpu") else ""
    threads = sorted({r.get("threads") for r in report["cases"] if r.get("threads")})
    lines = [
        f"Machine `{report['machine_slug']}`: {m['cpu_model']}, {m['cores_available']} usable "
        f"cores ({m['cores_logical']} logical){gpu}; torch {m['torch']}, threads "
        f"{'/'.join(map(str, threads)) or '?'}, device {m['device']}; load average at start "
        f"{m['load_average_start']}, at end {m.get('load_average_end')}.",
        "",
        "| kind | size | batch | variant | median ms | volumes/s | speed-up vs paper "
        "| speed-up vs loop | peak MiB | GFLOP | GFLOP/s | useful GFLOP/s | % of conv3d "
        "| roofline ms |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["cases"]:
        size = "x".join(map(str, r["shape"]))
        if r.get("error"):
            lines.append(
                f"| {r['kind']} | {size} | {r['batch']} | {r['variant']} | "
                f"failed: {r['error'][:80]} |||||||||||"
            )
            continue
        share = r.get("fraction_of_conv3d")
        memory = r.get("peak_memory_mib") if r.get("memory_isolated", True) else None
        lines.append(
            f"| {r['kind']} | {size} | {r['batch']} | {r['variant']} "
            f"| {_fmt(1e3 * r['median_s'])} | {_fmt(r['volumes_per_s'], 2)} "
            f"| {_fmt(r.get('speedup_vs_paper'), 2)} "
            f"| {_fmt(r.get('speedup_vs_loop'), 2)} | {_fmt(memory)} "
            f"| {_fmt(r['flops'] / 1e9 if r.get('flops') else None, 2)} "
            f"| {_fmt(r.get('gflops_per_s'))} | {_fmt(r.get('useful_gflops_per_s'))} "
            f"| {_fmt(100 * share if share is not None else None)} "
            f"| {_fmt(1e3 * r['roofline_s'] if r.get('roofline_s') else None)} |"
        )
    if report["warnings"]:
        lines += ["", *[f"Warning: {w}" for w in report["warnings"]]]
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark counterwarp's simulator: training step, explain latency, "
        "peak memory, throughput and FLOP rate, vectorised CondConv vs the per-sample loop.",
    )
    parser.add_argument(
        "--sizes", help=f"EDGE:BATCH list (default {DEFAULT_SIZES}; --quick: {QUICK_SIZES})"
    )
    parser.add_argument("--repeats", type=int, help="timed calls per case (default 5; quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads in each case (default: "
        "torch's own choice, which follows OMP_NUM_THREADS)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"CondConv implementations to run (default {','.join(IMPLS)}; 'bound' is one "
        "plain conv per layer: the ceiling of any CondConv speed-up)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"extra variants of the --variant-impls, from {','.join(VARIANTS)} "
        f"(default {','.join(DEFAULT_VARIANTS)}; '' for none)",
    )
    parser.add_argument(
        "--variant-impls",
        default="auto",
        help="implementations that get the variants (default auto)",
    )
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--bf16", action="store_true", help="add bf16 autocast variants")
    parser.add_argument("--no-explain", action="store_true", help="skip the explain cases")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: 16^3 batch 2, 1 repeat, small conv3d, one process",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument("--machine", help="results name (default: CPU model + cores, or GPU)")
    parser.add_argument(
        "--case-timeout",
        type=float,
        default=1800.0,
        help="seconds per case before its subprocess is killed (default 1800)",
    )
    parser.add_argument(
        "--isolate",
        choices=("auto", "case", "none"),
        default="auto",
        help="one subprocess per case ('case': needed for CPU peak memory) or "
        "one for all ('none'; compiled cases still get their own). Default "
        "'auto': 'case' on CPU, 'none' on CUDA and with --quick",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also write a torch.profiler table per case to <out>/<machine>-profile/",
    )
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.impls = tuple(s for s in args.impls.split(",") if s)
    args.variant_impls = tuple(s for s in args.variant_impls.split(",") if s)
    args.variants = [s for s in args.variants.split(",") if s]
    args.variants += [v for v, on in (("compile", args.compile), ("bf16", args.bf16)) if on]
    args.variants = tuple(dict.fromkeys(args.variants))
    for name, values, allowed in (
        ("impls", args.impls, IMPLS),
        ("variant-impls", args.variant_impls, IMPLS),
        ("variants", args.variants, VARIANTS),
    ):
        bad = sorted(set(values) - set(allowed))
        if bad:
            parser.error(f"unknown {name} {bad}; choose from {', '.join(allowed)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    try:
        args.sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; write ``<out>/<machine>.json`` and ``.md``; print the table."""
    args = _parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device",
            file=sys.stderr,
        )
        return 2
    info = machine_info(args.device)
    name = args.machine or machine_slug(info)
    if args.quick:
        name += "-quick"
    warnings = []
    load = info["load_average_start"]
    if load and info["cores_available"] and load[0] > 0.5 * info["cores_available"]:
        warnings.append(
            f"load average {load[0]} on {info['cores_available']} cores at the start: other "
            "work is running, timings are not representative"
        )
    if "bf16" in args.variants and args.device == "cpu" and not cpu_has_native_bf16():
        warnings.append("this CPU has no native bf16 (AMX / AVX512-BF16): bf16 is emulated")
    if args.quick:
        warnings.append(
            "--quick runs every case in one process: peak memory is not isolated "
            "per case (shown as '-')"
        )
    conv_reference = CONV_REFERENCE_QUICK if args.quick else CONV_REFERENCE
    cases = build_cases(
        args.sizes,
        args.impls,
        args.variants,
        conv_reference,
        explain=not args.no_explain,
        variant_impls=args.variant_impls,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    spec = {
        "device": args.device,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "profile_dir": str(args.out / f"{name}-profile") if args.profile else None,
    }
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    groups = group_cases(cases, args.isolate, args.quick, args.device)
    print(
        f"counterwarp bench: {len(cases)} cases on {args.device} ({info['cpu_model']}, "
        f"{info['cores_available']} cores, torch {info['torch']}) -> {args.out / name}.json",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    settings = {
        "sizes": [{"shape": list(s), "batch": b} for s, b in args.sizes],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "impls": list(args.impls),
        "variants": list(args.variants),
        "variant_impls": list(args.variant_impls),
        "quick": args.quick,
        "isolate": args.isolate,
        "conv_reference": dict(zip(("channels", "edge", "batch"), conv_reference, strict=True)),
        "margin": MARGIN,
    }

    def write_report(complete: bool) -> dict[str, Any]:
        order = {case.name: i for i, case in enumerate(cases)}
        results.sort(key=lambda r: order.get(r["name"], len(order)))
        info["load_average_end"] = _loadavg()
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": complete,
            "machine_slug": name,
            "machine": info,
            "settings": {**settings, "wall_s": round(time.perf_counter() - started, 1)},
            "reference": [r for r in results if r["kind"] == "conv3d"],
            "cases": results,
            "speedups": summarise(results),
            "warnings": warnings,
        }
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{name}.md").write_text(markdown(report) + "\n")
        return report

    signal.signal(signal.SIGTERM, _terminate)  # e.g. `timeout`: kill the case, keep the file
    stopped: BaseException | None = None
    try:
        for group in groups:
            for result in run_group(group, spec, args.case_timeout * len(group), env):
                # CUDA peaks are reset per case; CPU max RSS only means something per process
                result["memory_isolated"] = len(group) == 1 or args.device.startswith("cuda")
                results.append(result)
                status = (
                    f"failed: {result['error']}"
                    if result.get("error")
                    else f"{1e3 * result['median_s']:.1f} ms, {result['volumes_per_s']:.2f} vol/s, "
                    f"peak {result.get('peak_memory_mib')} MiB"
                )
                print(f"  {result['name']:<40} {status}", flush=True)
            write_report(complete=False)
    except (KeyboardInterrupt, SystemExit) as stop:
        stopped = stop
        warnings.append(f"interrupted after {len(results)} of {len(cases)} cases")
    report = write_report(complete=stopped is None)
    print()
    print(markdown(report))
    print(f"\nwrote {args.out / name}.json and {args.out / name}.md")
    if stopped is not None:
        return 130 if isinstance(stopped, KeyboardInterrupt) else 143
    failed = [r["name"] for r in results if r.get("error")]
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM handler: unwind (``subprocess.run`` then kills the running case)."""
    raise SystemExit(143)


if __name__ == "__main__":
    sys.exit(main())
