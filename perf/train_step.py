"""One training step of a residual MLP: eager, optimized, and torch.compile, as ratios in one run.

    python perf/train_step.py [--device cpu|cuda] [--width 256] [--rows N] [--blocks 8]
                              [--dtype fp32|bf16-autocast] [--repeats 15] [--threads 1]
                              [--no-compile] [--out results.json]

The model is ``blocks`` residual blocks ``x = x + fc2(gelu(fc1(x)))`` (both Linears
``width x width``) and a Linear head, trained with AdamW on an MSE loss. A step is
``zero_grad -> forward -> loss -> backward -> optimizer.step``. Variants, each on its own copy
of the same initial parameters:

- ``eager``: the model as written;
- ``optimized``: ``tritskip.optimize(model)`` (each block's two sites fused);
- ``compile``: ``torch.compile(model)`` of the eager model (default mode);
- ``compile+optimized``: ``torch.compile(optimize(model))``.

Before timing, every variant's gradients for one step are checked against the eager model in
float64: the error may be at most twice eager's own plus a small tolerance, or the run stops
(exit 1).

Timing: on CPU, wall time per step (``time.perf_counter``), the variants interleaved
round-robin after warm-up (which includes compilation), median and minimum over ``repeats``
rounds; on CUDA, ``triton.testing.do_bench`` per variant (synchronised, L2 flushed before each
repetition), all its repetitions. Ratios are eager time / variant time, so above 1 is faster
than eager.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tritskip.graph_pass import optimize


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class ResidualMLP(nn.Module):
    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class Trainer:
    """A model, its own AdamW and a callable that runs one training step."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], autocast: bool) -> None:
        self.model = model
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-3)
        self.autocast = autocast

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.mse_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.detach()


def build(args: argparse.Namespace, device: torch.device) -> dict[str, Trainer]:
    torch.manual_seed(0)
    base = ResidualMLP(args.width, args.blocks).to(device)
    autocast = args.dtype == "bf16-autocast"
    example = torch.randn(8, args.width, device=device)
    variants: dict[str, Callable[[nn.Module], nn.Module]] = {
        "eager": lambda m: m,
        "optimized": lambda m: optimize(m, example),
    }
    if not args.no_compile:
        variants["compile"] = torch.compile
        variants["compile+optimized"] = lambda m: torch.compile(optimize(m, example))
    trainers = {}
    for name, make in variants.items():
        model = copy.deepcopy(base)
        trainers[name] = Trainer(make(model), list(model.parameters()), autocast)
    return trainers


def check(trainers: dict[str, Trainer], x: torch.Tensor, y: torch.Tensor, dtype: str) -> list[str]:
    """Gradients of one step of every variant against a float64 oracle (the eager model).

    A variant passes when its largest gradient error, relative to the gradient's size, is at
    most twice eager's own in the same dtype plus a small tolerance.
    """
    oracle = copy.deepcopy(trainers["eager"].model).double()
    loss = F.mse_loss(oracle(x.double()), y.double())
    reference = torch.autograd.grad(loss, list(oracle.parameters()))
    errors = {}
    for name, t in trainers.items():
        t.opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=t.autocast):
            F.mse_loss(t.model(x), y).backward()
        errors[name] = max(
            ((p.grad.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
            for p, r in zip(t.params, reference, strict=True)
        )
        t.opt.zero_grad(set_to_none=True)
    slack = 1e-5 if dtype == "fp32" else 1e-2
    return [
        f"{name}: gradient error {err:.3g} vs float64, eager's {errors['eager']:.3g}"
        for name, err in errors.items()
        if err > 2 * errors["eager"] + slack
    ]


def time_cpu(trainers: dict[str, Trainer], x, y, warmup: int, repeats: int) -> dict[str, list]:
    for _ in range(warmup):
        for t in trainers.values():
            t.step(x, y)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, t in trainers.items():
            start = time.perf_counter()
            t.step(x, y)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def time_cuda(trainers: dict[str, Trainer], x, y, warmup: int, repeats: int) -> dict[str, list]:
    from triton.testing import do_bench

    times = {}
    for name, t in trainers.items():
        for _ in range(warmup):  # compilation and autotuning happen here, outside do_bench
            t.step(x, y)
        torch.cuda.synchronize()
        times[name] = do_bench(lambda t=t: t.step(x, y), return_mode="all")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument(
        "--rows", type=int, default=None, help="default: 1024 on CPU, 16384 on CUDA"
    )
    parser.add_argument("--dtype", choices=("fp32", "bf16-autocast"), default=None,
                        help="default: fp32 on CPU, bf16-autocast on CUDA")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (0: torch's choice); 1 keeps ratios stable "
                        "on a shared machine")  # fmt: skip
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.rows = args.rows or (16384 if on_cuda else 1024)
    args.dtype = args.dtype or ("bf16-autocast" if on_cuda else "fp32")
    if not on_cuda and args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False

    trainers = build(args, device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.rows, args.width, device=device, generator=g)
    y = torch.randn(args.rows, 1, device=device, generator=g)

    check_start = time.perf_counter()
    problems = check(trainers, x, y, args.dtype)
    check_s = time.perf_counter() - check_start  # includes compiling
    if problems:
        print("train_step: check failed\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1

    timer = time_cuda if on_cuda else time_cpu
    times = timer(trainers, x, y, args.warmup, args.repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}

    results = {
        "device": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: getattr(args, k) for k in ("width", "blocks", "rows", "dtype", "repeats")},
        "check_s": check_s,
        "median_ms": medians,
        "min_ms": {name: min(ts) for name, ts in times.items()},
        "eager_over": {name: medians["eager"] / m for name, m in medians.items()},
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    cfg = results["config"]
    print(f"training step, {cfg['blocks']} residual blocks, width {cfg['width']}, "
          f"{cfg['rows']} rows, {cfg['dtype']}, {device.type} ({results['threads']} threads), "
          f"median of {len(next(iter(times.values())))}")  # fmt: skip
    # On a shared CPU, load from other processes only adds time: the minimum is the steadier
    # figure there, the median the fairer one on a dedicated machine. Both are shown.
    mins = results["min_ms"]
    print(
        f"{'variant':<20}{'median ms':>10}{'min ms':>10}{'eager/x median':>16}{'eager/x min':>13}"
    )
    for name, m in medians.items():
        print(f"{name:<20}{m:>10.2f}{mins[name]:>10.2f}{results['eager_over'][name]:>16.2f}"
              f"{mins['eager'] / mins[name]:>13.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
