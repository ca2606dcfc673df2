"""The benchmark run: plan, correctness check, compilation, timing, in that order.

One :func:`run` call does everything for one device:

1. machine floors: a large copy (bandwidth) and a large matmul (matmul rate);
2. build every case (workload x width), check tritskip against a float64 oracle (outputs and
   all gradients; its error may be at most twice eager's in the same dtype, plus a small
   tolerance) and stop with an error if any case fails. The first calls of the fused
   variants happen here, so on a GPU this phase also holds Triton's compilation and autotuning;
3. per case: ``torch.compile`` each anchor that needs it (first call timed as compile time,
   skipped with the reason if compile is unavailable or the time budget would be exceeded),
   then time all variants interleaved, forward and forward+backward, and measure peak memory;
4. ``optimize()`` on residual MLPs of growing depth.

Ratios are ``anchor time / tritskip time`` (above 1: tritskip is faster), from medians.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import torch
from torch import nn

from .timing import CpuTimer, CudaTimer, Timing, make_timer, wall
from .workloads import WORKLOADS, Workload, flops, min_bytes

__all__ = ["ANCHORS", "MODES", "Plan", "RunResult", "make_plan", "run"]

log = logging.getLogger(__name__)

MODES = ("forward", "forward+backward")
ANCHORS = ("eager", "addmm", "compile", "max-autotune")
COMPILED = {"compile": "default", "max-autotune": "max-autotune"}


class CheckFailed(RuntimeError):
    """tritskip's result differs from the oracle by more than eager's own error allows."""


@dataclass
class Plan:
    """What one run measures: ``widths`` per workload name, ``rows`` per kind ("op", "model")."""

    device: str
    dtype: torch.dtype
    quick: bool
    widths: dict[str, list[int]]
    rows: dict[str, int]
    anchors: list[str]
    repeats: int = 1
    budget_s: float | None = None
    l2_bytes: int = 50 * 2**20
    scaling_depths: tuple[int, ...] = (10, 100, 1000)
    scaling_runs: int = 3
    prewarm: bool = False
    seed: int = 0

    @property
    def workloads(self) -> list[str]:
        return [name for name in WORKLOADS if self.widths.get(name)]

    def cases(self) -> list[tuple[Workload, int]]:
        """(workload, width) in priority order: op-level first, the chain of 16 shapes last."""
        return [(WORKLOADS[name], width) for name in self.workloads for width in self.widths[name]]


def _widths(op: list[int], model: list[int], **special: list[int]) -> dict[str, list[int]]:
    out = {name: list(op if w.kind == "op" else model) for name, w in WORKLOADS.items()}
    out.update(special)
    return out


def make_plan(
    device: str,
    quick: bool = False,
    *,
    workloads: list[str] | None = None,
    widths: list[int] | None = None,
    rows: int | None = None,
    anchors: list[str] | None = None,
    budget_s: float | None = None,
    scaling_depths: tuple[int, ...] | None = None,
) -> Plan:
    """The default plan for a device, sized for this repository's time limits.

    CPU (2 cores): fp32, 512 rows; ``quick`` runs in under a minute (one interleaved round per
    variant; ``torch.compile`` only while the run is under 40 s).

    CUDA (an H200, one command, 5 minutes including every compilation): bf16, rows large enough
    that each op is past launch overhead. What costs time on a cold machine is compiling (Triton
    builds every tile config for every epilogue, inductor builds every graph) and autotuning (one
    key per distinct Linear shape: the 16-layer chain alone has 48). So the op-level workloads
    get three widths either side of the ridge (N ~ 400), each model one width, and the chain the
    narrowest; Triton configs are compiled in parallel processes first, and a time budget skips
    the compile anchors of the last cases (recorded with the reason) rather than overrun.
    """
    if device == "cuda":
        if quick:
            plan_widths = _widths([256, 2048], [1024], policy_mlp=[128], dense_chain16=[])
        else:
            plan_widths = _widths([256, 1024, 4096], [1024], policy_mlp=[128],
                                  dense_chain16=[256])  # fmt: skip
        plan = Plan(
            device, torch.bfloat16, quick, plan_widths, rows={"op": 32768, "model": 16384},
            anchors=list(ANCHORS), repeats=1, budget_s=110.0 if quick else 255.0, prewarm=True,
        )  # fmt: skip
        props = torch.cuda.get_device_properties(0)
        plan.l2_bytes = int(getattr(props, "L2_cache_size", 0) or plan.l2_bytes)
        plan.scaling_runs = 1 if quick else 3
    else:
        if quick:
            plan_widths = _widths([64, 256], [128])
        else:
            plan_widths = _widths([64, 128, 256, 512, 1024], [64, 128, 256, 512])
        plan = Plan(
            device, torch.float32, quick, plan_widths, rows={"op": 512, "model": 512},
            anchors=[a for a in ANCHORS if a != "max-autotune"], repeats=1 if quick else 3,
            budget_s=40.0 if quick else None,
        )  # fmt: skip
        plan.scaling_runs = 1 if quick else 3
    if workloads:
        unknown = sorted(set(workloads) - set(WORKLOADS))
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; expected some of {list(WORKLOADS)}")
        plan.widths = {name: (ws if name in workloads else []) for name, ws in plan.widths.items()}
        for name in workloads:  # a workload the default plan leaves out gets the model widths
            plan.widths[name] = plan.widths[name] or plan.widths["residual_mlp8"] or [256]
    if widths:
        plan.widths = {name: (list(widths) if ws else []) for name, ws in plan.widths.items()}
    if rows:
        plan.rows = {"op": rows, "model": rows}
    if anchors is not None:
        unknown = sorted(set(anchors) - set(ANCHORS))
        if unknown:
            raise ValueError(f"unknown anchors {unknown}; expected some of {list(ANCHORS)}")
        plan.anchors = [a for a in ANCHORS if a in anchors]
    if budget_s is not None:
        plan.budget_s = budget_s if budget_s > 0 else None
    if scaling_depths is not None:
        plan.scaling_depths = tuple(scaling_depths)
    return plan


# Results ------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One (workload, width, mode, variant) cell."""

    workload: str
    width: int
    rows: int
    mode: str
    variant: str
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    timing: Timing | None = None
    peak_bytes: int | None = None
    compile_s: float | None = None
    flops: float = 0.0
    min_bytes: float = 0.0
    reference_ms: float | None = None  # tritskip's median, timed interleaved with this cell

    def as_dict(self, floors: dict) -> dict:
        out = {
            "workload": self.workload, "width": self.width, "rows": self.rows,
            "mode": self.mode, "variant": self.variant, "status": self.status,
            "reason": self.reason, "time_ms": self.timing.as_dict() if self.timing else None,
            "peak_mb": None if self.peak_bytes is None else self.peak_bytes / 2**20,
            "compile_s": self.compile_s, "flops": self.flops, "min_bytes": self.min_bytes,
            "tritskip_ms": self.reference_ms,
        }  # fmt: skip
        if self.timing:
            seconds = self.timing.median * 1e-3
            out["tflops"] = self.flops / seconds / 1e12
            out["gbps"] = self.min_bytes / seconds / 1e9
            floor = floor_seconds(self.flops, self.min_bytes, floors)
            out["floor_fraction"] = None if floor is None else floor / seconds
        return out


def floor_seconds(flop: float, nbytes: float, floors: dict) -> float | None:
    """Roofline floor: the larger of FLOPs / matmul rate and bytes / bandwidth."""
    rate, bandwidth = floors.get("matmul_flops"), floors.get("bandwidth_bytes")
    if not rate or not bandwidth or not floors.get("is_floor", True):
        return None
    return max(flop / rate, nbytes / bandwidth)


@dataclass
class RunResult:
    plan: Plan
    meta: dict = field(default_factory=dict)
    floors: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    scaling: dict = field(default_factory=dict)
    skipped_cases: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def ratios(self) -> list[dict]:
        """``anchor / tritskip`` per (workload, width, mode, anchor), from medians.

        The tritskip time is the one measured interleaved with that anchor (in the same block of
        rounds), so a drift of the machine between blocks does not enter the ratio.
        """
        out = []
        for m in self.measurements:
            if m.variant == "tritskip" or not m.timing or not m.reference_ms:
                continue
            out.append({"workload": m.workload, "width": m.width, "mode": m.mode,
                        "anchor": m.variant, "ratio": m.timing.median / m.reference_ms})  # fmt: skip
        return out

    def summary(self) -> list[dict]:
        """min / median / max of the ratio over widths per (workload, mode, anchor)."""
        groups: dict[tuple, list[float]] = defaultdict(list)
        for r in self.ratios():
            groups[(r["workload"], r["mode"], r["anchor"])].append(r["ratio"])
        order = {name: i for i, name in enumerate(WORKLOADS)}
        rows = []
        for (wl, mode, anchor), values in groups.items():
            values.sort()
            rows.append({"workload": wl, "mode": mode, "anchor": anchor, "min": values[0],
                         "median": _median(values), "max": values[-1], "n": len(values)})  # fmt: skip
        rows.sort(key=lambda r: (order.get(r["workload"], 99), MODES.index(r["mode"]),
                                 ANCHORS.index(r["anchor"])))  # fmt: skip
        return rows


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


# Environment ---------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: str) -> str:
    """A short, file-name-safe device name: ``nvidia-h200``, ``cpu-amd-epyc``."""
    if device == "cuda":
        return _slug(torch.cuda.get_device_name(0))
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1]
                    break
    except OSError:
        pass
    return "cpu-" + (_slug(model) or platform.machine())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def compile_unavailable(device: str) -> str | None:
    """Why ``torch.compile`` (inductor) cannot run here, or None when it can be tried."""
    if not hasattr(torch, "compile"):
        return "torch.compile is missing from this PyTorch"
    if device == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None and shutil.which("c++") is None:
            return f"no C++ compiler found ({cxx}); inductor's CPU backend needs one"
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed; inductor's CUDA backend needs it"
    return None


def collect_meta(plan: Plan, argv: list[str] | None) -> dict:
    import tritskip

    meta = {
        "date": date.today().isoformat(), "device": plan.device,
        "device_name": device_name(plan.device), "dtype": str(plan.dtype).replace("torch.", ""),
        "quick": plan.quick, "rows": plan.rows, "widths": plan.widths,
        "anchors": plan.anchors, "torch": torch.__version__, "tritskip": tritskip.__version__,
        "python": platform.python_version(), "git_commit": _git_commit(),
        "threads": torch.get_num_threads(), "argv": argv or [],
    }  # fmt: skip
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if plan.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["l2_bytes"] = plan.l2_bytes
    return meta


# Machine floors ------------------------------------------------------------------------------


def measure_floors(plan: Plan, timer: CpuTimer | CudaTimer) -> dict:
    """Copy bandwidth (bytes/s) and matmul rate (FLOP/s) measured in this run."""
    device = plan.device
    if device == "cuda":
        copy_elems, n, mm_dtype = 2**29, 8192, torch.bfloat16  # 1 GiB bf16 each way
    else:
        copy_elems, n, mm_dtype = 2**25 if not plan.quick else 2**24, 1024, torch.float32
    src = torch.ones(copy_elems, dtype=mm_dtype, device=device)
    dst = torch.empty_like(src)
    copy_ms = Timing.from_ms(timer.measure(lambda: dst.copy_(src), "copy")).median
    copy_bytes = 2 * src.numel() * src.element_size()
    src = dst = None  # free the copy buffers before the matmul
    a = torch.randn(n, n, dtype=mm_dtype, device=device)
    b = torch.randn(n, n, dtype=mm_dtype, device=device)
    mm_ms = Timing.from_ms(timer.measure(lambda: torch.mm(a, b), "matmul")).median
    floors = {
        "bandwidth_bytes": copy_bytes / (copy_ms * 1e-3),
        "matmul_flops": 2.0 * n**3 / (mm_ms * 1e-3),
        "copy_bytes": copy_bytes, "matmul_n": n, "matmul_dtype": str(mm_dtype),
        "is_floor": device == "cuda",
    }  # fmt: skip
    if device != "cuda":
        # The CPU cases fit in cache and are not flushed between calls: a DRAM copy rate is
        # no lower bound for them, so no floor fraction is reported on CPU.
        floors["note"] = "CPU: working sets stay in cache; rates are reference points only"
    return floors


# Cases ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One workload at one width, built on the device, with its variants and inputs."""

    workload: Workload
    width: int
    rows: int
    plain: nn.Module
    variants: dict[str, nn.Module]  # eager, addmm, tritskip, and compiled anchors later
    xs: list[torch.Tensor]  # rotated inputs (requires_grad: also the forward+backward inputs)
    grads: list[torch.Tensor]  # rotated output gradients
    params: list[torch.Tensor]
    errors: dict[str, str] = field(default_factory=dict)  # variant -> why it is missing
    compile_s: dict[str, list[float]] = field(default_factory=dict)  # anchor -> per mode

    @property
    def key(self) -> str:
        return f"{self.workload.name}@{self.width}"


def _fused_variant(workload: Workload, plain: nn.Module) -> nn.Module:
    fused = workload.fused(plain)
    if fused is not None:
        return fused
    from ..graph_pass import optimize

    return optimize(plain)


def build_case(plan: Plan, workload: Workload, width: int, phases: dict) -> Case:
    torch.manual_seed(plan.seed)
    rows = plan.rows[workload.kind]
    plain = workload.build(width).to(device=plan.device, dtype=plan.dtype)
    start = time.perf_counter()
    fused = _fused_variant(workload, plain)
    phases["optimize (build)"] += time.perf_counter() - start
    params = list(plain.parameters())
    k = workload.in_features(width)
    with torch.no_grad():
        out_features = plain(torch.zeros(1, k, device=plan.device, dtype=plan.dtype)).shape[-1]
    n_sets = 1
    if plan.device == "cuda":
        per_set = rows * (k + out_features) * torch.finfo(plan.dtype).bits // 8
        n_sets = max(1, min(256, math.ceil(2 * plan.l2_bytes / per_set)))
    xs = [torch.randn(rows, k, device=plan.device, dtype=plan.dtype).requires_grad_()
          for _ in range(n_sets)]  # fmt: skip
    grads = [torch.randn(rows, out_features, device=plan.device, dtype=plan.dtype)
             for _ in range(n_sets)]  # fmt: skip
    variants = {"eager": plain, "addmm": workload.addmm(plain), "tritskip": fused}
    return Case(workload, width, rows, plain, variants, xs, grads, params)


def step_fn(case: Case, model: nn.Module, mode: str) -> Callable[[], None]:
    """One call of ``model`` on the next rotated input (and its backward, in that mode)."""
    index = itertools.cycle(range(len(case.xs)))
    if mode == "forward":

        def forward() -> None:
            model(case.xs[next(index)])

        return forward
    inputs = [[x, *case.params] for x in case.xs]

    def forward_backward() -> None:
        i = next(index)
        torch.autograd.grad(model(case.xs[i]), inputs[i], case.grads[i])

    return forward_backward


def _grad_mode(mode: str):
    return torch.enable_grad() if mode == "forward+backward" else torch.no_grad()


# Correctness ---------------------------------------------------------------------------------


def _outputs(model: nn.Module, x: torch.Tensor, g: torch.Tensor, params: list) -> list:
    """The output of ``model(x)`` and the gradients of ``<out, g>`` for ``x`` and ``params``."""
    out = model(x)
    return [out.detach(), *torch.autograd.grad(out, [x, *params], g)]


def check_case(plan: Plan, case: Case) -> dict:
    """tritskip vs a float64 oracle, outputs and all gradients, judged by eager's own error."""
    x, g = case.xs[0], case.grads[0]
    oracle = copy.deepcopy(case.plain).double()
    xd = x.detach().double().requires_grad_()
    with torch.enable_grad():
        ref = _outputs(oracle, xd, g.double(), list(oracle.parameters()))
        eager = _outputs(case.plain, x, g, case.params)
        # The same Parameter objects: tritskip must train the model it was given.
        fused = _outputs(case.variants["tritskip"], x, g, case.params)
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in case.plain.named_parameters()]
    atol = 1e-5 if plan.dtype == torch.float32 else 2e-3
    worst, failures = 0.0, []
    for name, r, e, f in zip(names, ref, eager, fused, strict=True):
        if f.shape != r.shape:
            failures.append(f"{name}: shape {tuple(f.shape)} != {tuple(r.shape)}")
            continue
        scale = r.abs().max().item() or 1.0
        err_e = (e.double() - r).abs().max().item() / scale
        err_f = (f.double() - r).abs().max().item() / scale
        allowed = 2 * err_e + atol
        worst = max(worst, err_f / allowed)
        if not err_f <= allowed:
            failures.append(f"{name}: error {err_f:.3g} > {allowed:.3g} (eager {err_e:.3g})")
    return {"workload": case.workload.name, "width": case.width, "ok": not failures,
            "worst_fraction_of_allowed": worst, "failures": failures}  # fmt: skip


# The run ---------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar when tqdm is importable, else nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None

    def step(self, text: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:48])
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Budget:
    """Wall-clock budget of a run; ``allows(seconds)`` says whether that much work still fits."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds

    def reason(self, needed: float) -> str:
        return f"skipped: time budget ({max(0.0, self.left()):.0f} s left, needs ~{needed:.0f} s)"


def _configure_dynamo() -> None:
    import torch._dynamo

    # Every width is a separate, static compilation; the default limit of 8 per code object
    # would fall back to eager silently once the widths and modes of one workload add up.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4096
    )


def run(plan: Plan, *, argv: list[str] | None = None, progress: bool = True) -> RunResult:
    """Run the whole plan and return its results (nothing is written here; see ``report``).

    Order: machine floors; (CUDA) parallel Triton builds; build and check every case, which
    also autotunes the fused kernels; time tritskip, eager and addmm for every case; time
    ``optimize()`` against depth; then, case by case while the budget allows, compile each
    ``torch.compile`` anchor and time it against tritskip again. Raises :class:`CheckFailed` before any
    timing when a fused result is wrong.
    """
    result = RunResult(plan)
    phases = result.phases
    started = time.perf_counter()
    budget = _Budget(plan.budget_s)
    timer = make_timer(plan.device, plan.quick)
    result.meta = collect_meta(plan, argv)
    planned = plan.cases()
    compiled = [a for a in plan.anchors if a in COMPILED]
    base = [a for a in plan.anchors if a not in COMPILED]
    total = 1 + len(planned) * (2 + len(compiled)) + len(plan.scaling_depths)
    bar = _Progress(total, progress)

    # 1. Machine floors.
    t = time.perf_counter()
    result.floors = measure_floors(plan, timer)
    phases["roofline"] += time.perf_counter() - t
    bar.step("roofline")

    # 2. Triton builds in parallel processes, so first calls find every config compiled.
    if plan.prewarm and plan.device == "cuda":
        from .prewarm import prewarm

        t = time.perf_counter()
        result.meta["prewarm"] = prewarm(plan, timeout=max(30.0, 0.4 * budget.left()))
        phases["compile (Triton configs, parallel)"] += time.perf_counter() - t

    # 3. Build and check every case before any timing; the first calls autotune.
    cases: list[Case] = []
    failures: list[str] = []
    last = 0.0  # seconds the previous case took to build, autotune and check
    for workload, width in planned:
        if cases and not budget.allows(last + 10):
            result.skipped_cases.append({"workload": workload.name, "width": width,
                                         "reason": budget.reason(last + 10)})  # fmt: skip
            bar.step(f"skip {workload.name}@{width}", 2 + len(compiled))
            continue
        t = time.perf_counter()
        try:
            case = build_case(plan, workload, width, phases)
            for mode in MODES:
                with _grad_mode(mode):
                    phases["autotune (tritskip first calls)"] += wall(
                        step_fn(case, case.variants["tritskip"], mode), timer
                    )
            c = time.perf_counter()
            report = check_case(plan, case)
            phases["check"] += time.perf_counter() - c
        except Exception as exc:  # a build or first-call error fails the check: stop below
            failures.append(f"{workload.name}@{width}: tritskip failed to run: {exc!r}"[:2000])
            bar.step(f"check {workload.name}@{width}", 2 + len(compiled))
            continue
        result.checks.append(report)
        if not report["ok"]:
            failures += [f"{case.key}: {f}" for f in report["failures"]]
        cases.append(case)
        last = time.perf_counter() - t
        bar.step(f"check {case.key}")
    if failures:
        bar.close()
        raise CheckFailed("tritskip differs from the float64 oracle by more than eager does, "
                          "or does not run:\n  " + "\n  ".join(failures))  # fmt: skip

    # 4. tritskip, eager and addmm for every case, interleaved.
    for case in cases:
        _time_case(plan, case, ["tritskip", *base], timer, result)
        bar.step(f"time {case.key}")

    # 5. optimize() cost against depth (CPU work; before the budgeted compile anchors).
    if plan.scaling_depths:
        from .scaling import time_optimize

        t = time.perf_counter()
        result.scaling = time_optimize(plan.scaling_depths, runs=plan.scaling_runs,
                                       on_step=lambda d: bar.step(f"optimize x{d}"))  # fmt: skip
        phases["optimize scaling"] += time.perf_counter() - t

    # 6. torch.compile anchors, case by case, while the budget allows.
    if compiled:
        _configure_dynamo()
        reason = compile_unavailable(plan.device)
        estimates = {"compile": 5.0 if plan.device == "cpu" else 8.0, "max-autotune": 40.0}
        spent: dict[str, list[float]] = defaultdict(list)
        for anchor in compiled:
            for case in cases:
                history = spent[anchor]
                needed = len(MODES) * (max(history) if history else estimates[anchor])
                if reason:
                    case.errors[anchor] = f"skipped: {reason}"
                elif not budget.allows(needed + 5):
                    case.errors[anchor] = budget.reason(needed + 5)
                else:
                    _add_compiled(case, anchor, timer, history)
                    failed = case.errors.get(anchor, "").startswith("torch.compile failed")
                    if failed and not any(spent.values()):
                        reason = case.errors[anchor]  # the first compile failed: skip the rest
                _time_case(plan, case, ["tritskip", anchor], timer, result)
                case.variants.pop(anchor, None)
                import torch._dynamo

                torch._dynamo.reset()
                bar.step(f"{anchor} {case.key}")
        for anchor in compiled:
            if spent[anchor]:
                phases[f"compile ({anchor} first calls)"] = sum(spent[anchor])
    for case in cases:
        case.variants.clear()
        case.xs.clear()
        case.grads.clear()

    bar.close()
    phases["total"] = time.perf_counter() - started
    return result


def _add_compiled(case: Case, anchor: str, timer, history: list[float]) -> None:
    """Compile ``case.plain`` for ``anchor`` and make its first calls (timed as compile)."""
    model = torch.compile(case.plain, mode=COMPILED[anchor], dynamic=False)
    seconds = []
    try:
        for mode in MODES:
            with _grad_mode(mode):
                seconds.append(wall(step_fn(case, model, mode), timer))
    except Exception as exc:  # inductor errors are many; record and go on with the others
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        case.errors[anchor] = f"torch.compile failed: {type(exc).__name__}: {first_line[:200]}"
        log.warning("%s %s: %s", case.key, anchor, case.errors[anchor])
        return
    history.extend(seconds)
    case.variants[anchor] = model
    case.compile_s[anchor] = seconds


def _time_case(plan: Plan, case: Case, names: list[str], timer, result: RunResult) -> None:
    """Time ``names`` (tritskip first) on one case, interleaved over ``plan.repeats`` rounds.

    Every cell but tritskip's own gets ``reference_ms``: tritskip's median from the same rounds.
    A tritskip cell is recorded once per case and mode (from the first block).
    """
    wl = case.workload
    specs = wl.specs(case.width)
    itemsize = torch.finfo(plan.dtype).bits // 8
    seen = {(m.mode, m.variant) for m in result.measurements
            if (m.workload, m.width) == (wl.name, case.width)}  # fmt: skip
    t = time.perf_counter()
    for mi, mode in enumerate(MODES):
        backward = mode == "forward+backward"
        cells = {}
        for name in names:
            cell = Measurement(wl.name, case.width, case.rows, mode, name,
                               flops=flops(specs, case.rows, backward),
                               min_bytes=min_bytes(specs, case.rows, itemsize, backward))  # fmt: skip
            if name in case.compile_s:
                cell.compile_s = case.compile_s[name][mi]
            if name not in case.variants:
                reason = case.errors.get(name, "not built")
                cell.status = "error" if reason.startswith("torch.compile failed") else "skipped"
                cell.reason = reason
            cells[name] = cell
        runnable = [n for n in names if cells[n].status == "ok"]
        samples: dict[str, list[float]] = defaultdict(list)
        needed = any(n != "tritskip" for n in runnable) or (mode, "tritskip") not in seen
        with _grad_mode(mode):
            if needed:
                for _ in range(plan.repeats):
                    for name in runnable:
                        fn = step_fn(case, case.variants[name], mode)
                        try:
                            samples[name] += timer.measure(fn, f"{case.key}:{mode}:{name}")
                        except Exception as exc:
                            cells[name].status, cells[name].reason = "error", repr(exc)[:200]
            for name in runnable if needed else []:
                cell = cells[name]
                if cell.status == "ok":
                    cell.timing = Timing.from_ms(samples[name])
                    cell.peak_bytes = timer.peak_memory(step_fn(case, case.variants[name], mode))
        reference = cells["tritskip"].timing.median if cells["tritskip"].timing else None
        for name in names:
            if name == "tritskip":
                if (mode, name) not in seen:
                    result.measurements.append(cells[name])
                continue
            cells[name].reference_ms = reference
            result.measurements.append(cells[name])
    result.phases["timing"] += time.perf_counter() - t
