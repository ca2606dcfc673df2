"""DenseChain against the eager chain and torch.compile: time, peak memory, bytes moved.

    python perf/dense_chain.py [--quick] [--out perf/results/dense_chain_<device>.json]

Workloads: ``h = cat([relu(fc_i(h)), h], -1)`` for ``i = 1..L``, input width 64, M = 4096 rows,
float32. Part 1 times a 16-layer chain of growth 32 and a 32-layer chain of growth 64, forward
(under ``no_grad``) and forward+backward (parameters require grad, the input does not), for

- ``eager``: the chain written out with ``torch.cat``, as a user would;
- ``compile``: ``torch.compile`` of that eager module (default mode);
- ``chain``: :class:`tritskip.dense_chain.DenseChain` over the same layers.

Part 2 measures peak memory of forward+backward for L = 8, 16, 32, 64 (growth 32) to show how
it grows with L.

What is measured:

- time: wall time per call (``time.perf_counter``, with ``torch.cuda.synchronize`` on a GPU),
  the variants' calls interleaved round-robin after warm-up; the first call of each variant
  (compilation) is part of the warm-up. The table shows the minimum over the repeats, since
  load from other processes only ever adds time; the JSON has the median too. Ratios are
  eager/chain and compile/chain, so > 1 means the chain is faster.
- peak memory, CPU: the largest number of bytes of tensor storage live at once during one call,
  above what was live before it, counted from the allocation and free events that
  ``torch.profiler`` (``profile_memory=True``) records for PyTorch's CPU allocator. It counts
  every tensor PyTorch allocates (intermediates, saved activations, gradients, temporaries
  inside ops), and not the Python heap or allocator caching. On CUDA:
  ``torch.cuda.max_memory_allocated`` over one call, less the bytes allocated before it.
- bytes moved: counted by formula, not measured. Each elementwise op, copy or GEMM operand is
  charged one read of each activation operand and one write of its result; weights and cache
  reuse are ignored, so it is the activation traffic each schedule must at least generate.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from tritskip.dense_chain import DenseChain
from tritskip.ops import uses_triton

K0, M = 64, 4096
TIMED = [(16, 32), (32, 64)]  # (num_layers, growth)
SCALING = [8, 16, 32, 64]  # num_layers at growth 32


class EagerChain(nn.Module):
    """The chain as written by hand, over the same layers as a DenseChain."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = torch.cat([torch.relu(layer(h)), h], dim=-1)
        return h


# --- bytes moved, by formula -------------------------------------------------------------------


def bytes_moved(schedule: str, num_layers: int, growth: int, itemsize: int) -> dict[str, int]:
    """Activation bytes read plus written by one forward and one backward (see module doc).

    Layer i reads ``K_i = K0 + (i - 1) * growth`` columns and writes ``growth``. Per layer, in
    units of ``M * itemsize`` bytes:

    - eager forward: addmm reads K_i, writes g; relu reads and writes g; cat reads g + K_i and
      writes K_i + g. Total 3 K_i + 5 g.
    - chain forward (PyTorch path): addmm reads the K_i-column view and writes g into the
      buffer; relu in place reads and writes g: K_i + 3 g, plus one copy of the input (2 K0).
      The Triton path applies relu before its store: K_i + g.
    - eager backward: relu backward reads grad and output, writes g (3 g); dX reads g, writes
      K_i; dW reads g and K_i; db reads g; autograd adds dX to the slice of the upstream grad
      that cat's backward passed through (reads 2 K_i, writes K_i). Total 5 K_i + 6 g.
    - chain backward: relu backward 3 g; dW reads g and K_i; db reads g; ``addmm_`` into the
      gradient buffer reads g and reads and writes K_i. Total 3 K_i + 6 g, plus copying
      grad_out into the gradient buffer (2 C, C the final width).
    """
    g = growth
    ks = [K0 + i * g for i in range(num_layers)]
    width = K0 + num_layers * g
    if schedule == "eager":
        fwd = sum(3 * k + 5 * g for k in ks)
        bwd = sum(5 * k + 6 * g for k in ks)
    elif schedule in ("chain", "chain_triton"):
        per_layer_fwd = 3 * g if schedule == "chain" else g
        fwd = 2 * K0 + sum(k + per_layer_fwd for k in ks)
        bwd = 2 * width + sum(3 * k + 6 * g for k in ks)
    else:
        raise ValueError(schedule)
    unit = M * itemsize
    return {"forward": fwd * unit, "backward": bwd * unit, "forward_backward": (fwd + bwd) * unit}


def saved_bytes(schedule: str, num_layers: int, growth: int, itemsize: int) -> int:
    """Activations kept for the backward: eager keeps each layer's input and relu output,
    the chain keeps its one output buffer."""
    ks = [K0 + i * growth for i in range(num_layers)]
    if schedule == "eager":
        return sum(k + growth for k in ks) * M * itemsize
    return (K0 + num_layers * growth) * M * itemsize


# --- meters ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Min and median ms per call of each function, calls interleaved round-robin so that a
    change in machine load during the run weighs on every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"min": min(ts), "median": statistics.median(ts)} for name, ts in times.items()}


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor storage live during ``fn()``, above what was live before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        node
        for node in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu"
    ]
    live = peak = 0
    for node in sorted(events, key=lambda n: n.start_time_ns):
        live += node.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


# --- workloads ---------------------------------------------------------------------------------


def make_models(num_layers: int, growth: int, device, dtype):
    torch.manual_seed(0)
    chain = DenseChain(K0, growth, num_layers, "relu", device=device, dtype=dtype)
    return chain, EagerChain(chain.layers)


def step_fns(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, Callable]:
    params = list(model.parameters())

    def forward():
        with torch.no_grad():
            return model(x)

    def forward_backward():
        for p in params:
            p.grad = None
        model(x).backward(grad)

    return {"forward": forward, "forward_backward": forward_backward}


def check_same(chain, eager, x) -> float:
    """Max abs difference of the outputs; the chain must equal eager before it is timed."""
    with torch.no_grad():
        a, b = chain(x), eager(x)
    if a.shape != b.shape or a.stride() != b.stride():
        raise AssertionError(f"layout differs: {a.shape}/{a.stride()} vs {b.shape}/{b.stride()}")
    return (a - b).abs().max().item()


def run_timed(device, dtype, repeats, warmup, use_compile) -> list[dict]:
    rows = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for num_layers, growth in TIMED:
        chain, eager = make_models(num_layers, growth, device, dtype)
        x = torch.randn(M, K0, device=device, dtype=dtype)
        grad = torch.randn(M, chain.out_features, device=device, dtype=dtype)
        diff = check_same(chain, eager, x)
        variants: dict[str, nn.Module] = {"eager": eager, "chain": chain}
        compile_error = None
        if use_compile:
            try:
                compiled = torch.compile(EagerChain(chain.layers))
                check_same(chain, compiled, x)
                variants["compile"] = compiled
            except Exception as exc:  # report why, time the rest
                compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            compile_error = "disabled (--no-compile)"
        chain_schedule = "chain_triton" if uses_triton(x) else "chain"
        for mode in ("forward", "forward_backward"):
            row = {
                "num_layers": num_layers,
                "growth": growth,
                "in_features": K0,
                "rows": M,
                "out_features": chain.out_features,
                "mode": mode,
                "max_abs_diff_vs_eager": diff,
                "compile_skipped": compile_error,
                "bytes_formula": {
                    "eager": bytes_moved("eager", num_layers, growth, itemsize)[mode],
                    "chain": bytes_moved(chain_schedule, num_layers, growth, itemsize)[mode],
                },
            }
            fns = {name: step_fns(model, x, grad)[mode] for name, model in variants.items()}
            for name, ms in interleaved_ms(fns, device, repeats, warmup).items():
                row[f"{name}_ms"] = ms["min"]
                row[f"{name}_median_ms"] = ms["median"]
            for name, fn in fns.items():
                variants[name].zero_grad(set_to_none=True)  # free old grads outside the meter
                row[f"{name}_peak_bytes"] = peak_bytes(fn, device)
            row["speedup_vs_eager"] = row["eager_ms"] / row["chain_ms"]
            if "compile_ms" in row:
                row["speedup_vs_compile"] = row["compile_ms"] / row["chain_ms"]
            rows.append(row)
            print(_timed_line(row), flush=True)
    return rows


def run_scaling(device, dtype) -> list[dict]:
    rows = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    growth = 32
    for num_layers in SCALING:
        chain, eager = make_models(num_layers, growth, device, dtype)
        x = torch.randn(M, K0, device=device, dtype=dtype)
        grad = torch.randn(M, chain.out_features, device=device, dtype=dtype)
        row = {"num_layers": num_layers, "growth": growth, "out_features": chain.out_features}
        for name, model in (("eager", eager), ("chain", chain)):
            fn = step_fns(model, x, grad)["forward_backward"]
            fn()
            model.zero_grad(set_to_none=True)  # free old grads outside the meter
            row[f"{name}_peak_bytes"] = peak_bytes(fn, device)
            row[f"{name}_saved_bytes_formula"] = saved_bytes(name, num_layers, growth, itemsize)
        rows.append(row)
        print(
            f"  L={num_layers:3d}  eager {row['eager_peak_bytes'] / 2**20:8.1f} MiB   "
            f"chain {row['chain_peak_bytes'] / 2**20:8.1f} MiB",
            flush=True,
        )
    return rows


def growth_order(values: list[float], layers: list[int]) -> list[float]:
    """log2(peak(2L) / peak(L)) between successive L: 1 for linear growth, 2 for quadratic."""
    import math

    return [
        math.log2(b / a) / math.log2(lb / la)
        for a, b, la, lb in zip(values, values[1:], layers, layers[1:], strict=False)
    ]


def _timed_line(row: dict) -> str:
    compiled = f"{row['compile_ms']:9.1f}" if "compile_ms" in row else "     skip"
    vs_compile = f"{row['speedup_vs_compile']:5.2f}x" if "speedup_vs_compile" in row else "   - "
    return (
        f"  L={row['num_layers']:2d} g={row['growth']:2d} {row['mode']:16s}"
        f" eager {row['eager_ms']:9.1f} ms  compile {compiled} ms  chain {row['chain_ms']:9.1f} ms"
        f"  | chain vs eager {row['speedup_vs_eager']:5.2f}x  vs compile {vs_compile}"
    )


def print_tables(timed: list[dict], scaling: list[dict]) -> None:
    mib = 2**20
    print("\nTime (min ms over repeats) and speedup of the chain (eager / chain, compile / chain)")
    header = (
        f"{'L':>3} {'g':>3} {'mode':<16} {'eager':>9} {'compile':>9} {'chain':>9}"
        f" {'vs eager':>9} {'vs compile':>10}"
    )
    print(header)
    for r in timed:
        compiled = f"{r['compile_ms']:9.1f}" if "compile_ms" in r else f"{'skip':>9}"
        vs_compile = (
            f"{r['speedup_vs_compile']:9.2f}x" if "speedup_vs_compile" in r else "         -"
        )
        print(
            f"{r['num_layers']:>3} {r['growth']:>3} {r['mode']:<16} {r['eager_ms']:9.1f}"
            f" {compiled} {r['chain_ms']:9.1f} {r['speedup_vs_eager']:8.2f}x {vs_compile}"
        )
    print("\nPeak memory (MiB) and bytes moved by formula (MiB) of the same runs")
    print(
        f"{'L':>3} {'g':>3} {'mode':<16} {'eager':>9} {'compile':>9} {'chain':>9}"
        f" {'moved eager':>12} {'moved chain':>12}"
    )
    for r in timed:
        compiled = f"{r['compile_peak_bytes'] / mib:9.1f}" if "compile_ms" in r else f"{'skip':>9}"
        print(
            f"{r['num_layers']:>3} {r['growth']:>3} {r['mode']:<16}"
            f" {r['eager_peak_bytes'] / mib:9.1f} {compiled} {r['chain_peak_bytes'] / mib:9.1f}"
            f" {r['bytes_formula']['eager'] / mib:12.0f} {r['bytes_formula']['chain'] / mib:12.0f}"
        )
    if scaling:
        layers = [r["num_layers"] for r in scaling]
        eager_order = growth_order([r["eager_peak_bytes"] for r in scaling], layers)
        chain_order = growth_order([r["chain_peak_bytes"] for r in scaling], layers)
        print("\nPeak memory of forward+backward vs L (growth 32); order = log2 ratio per doubling")
        print(
            f"{'L':>3} {'eager MiB':>10} {'chain MiB':>10} {'eager/chain':>12}"
            f" {'order eager':>12} {'order chain':>12}"
        )
        for i, r in enumerate(scaling):
            oe = f"{eager_order[i - 1]:12.2f}" if i else f"{'':>12}"
            oc = f"{chain_order[i - 1]:12.2f}" if i else f"{'':>12}"
            print(
                f"{r['num_layers']:>3} {r['eager_peak_bytes'] / mib:10.1f}"
                f" {r['chain_peak_bytes'] / mib:10.1f}"
                f" {r['eager_peak_bytes'] / r['chain_peak_bytes']:11.2f}x {oe} {oc}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile anchor")
    parser.add_argument("--no-scaling", action="store_true", help="skip the L = 8..64 sweep")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op CPU threads (default: PyTorch's choice); on a machine shared with other "
        "jobs, 1 avoids parallel regions stalling on a descheduled thread",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    repeats, warmup = (3, 1) if args.quick else (9, 2)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {dtype}, M={M}, K0={K0}",
        flush=True,
    )
    print("Part 1: timed chains", flush=True)
    timed = run_timed(device, dtype, repeats, warmup, not args.no_compile)
    scaling = []
    if not args.no_scaling:
        print("Part 2: peak memory of forward+backward vs L", flush=True)
        scaling = run_scaling(device, dtype)
    print_tables(timed, scaling)

    out = args.out or Path(__file__).parent / "results" / f"dense_chain_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype),
        "python": sys.version.split()[0],
        "time_method": "min (and median) wall time per call over interleaved repeats",
        "memory_method": (
            "cuda.max_memory_allocated minus allocated before the call"
            if device.type == "cuda"
            else "peak live bytes from torch.profiler CPU allocator events, minus live at start"
        ),
        "timed": timed,
        "scaling": scaling,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
