"""Compile the fused kernels' Triton configs in parallel processes before a CUDA run.

Triton's autotuner compiles each config of a kernel on first use, one after another, and every
epilogue (its constexpr flags) is a separate build: on a cold machine a benchmark plan needs
well over a hundred builds. Here one worker process per config index runs every case of the plan
once with ``Autotuner.run`` replaced by a build-only version (``JITFunction.warmup`` for that
worker's configs; nothing is launched). The builds land in Triton's on-disk cache, so the main
process's first calls load them and only benchmark the configs.

Best effort: a worker that fails or runs out of time costs nothing but the builds it did not do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

__all__ = ["prewarm"]


def prewarm(plan, timeout: float) -> dict:
    """Build every Triton config the plan's tritskip variants will use; returns a summary."""
    try:
        from ..kernels.linear_epilogue import default_configs
    except ImportError as exc:
        return {"workers": 0, "seconds": 0.0, "note": f"kernels unavailable: {exc}"}
    workers = max(1, min(len(default_configs()), os.cpu_count() or 1))
    spec = json.dumps({
        "cases": [[w.name, width] for w, width in plan.cases()], "rows": plan.rows,
        "dtype": str(plan.dtype).replace("torch.", ""), "workers": workers, "seed": plan.seed,
    })  # fmt: skip
    start = time.perf_counter()
    command = [sys.executable, "-m", "tritskip.benchmarks.prewarm", spec]
    procs = []
    for j in range(workers):
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(subprocess.Popen([*command, str(j)], **pipes))
    failed = []
    for j, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failed.append(f"worker {j}: timed out after {timeout:.0f} s")
            continue
        if proc.returncode != 0:
            tail = " | ".join(out.strip().splitlines()[-3:])
            failed.append(f"worker {j}: exit {proc.returncode}: {tail[:400]}")
    return {"workers": workers, "seconds": time.perf_counter() - start, "failed": failed}


def _build_only(index: int, workers: int):
    """An ``Autotuner.run`` that builds this worker's share of the configs and launches none."""

    def run(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        try:
            kept = self.prune_configs(kwargs)
            for config in kept:
                position = next(i for i, c in enumerate(self.configs) if c is config)
                if position % workers == index:
                    self.fn.warmup(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    return run


def _worker(spec: dict, index: int) -> None:
    import torch
    import triton.runtime.autotuner as autotuner

    from .runner import MODES, Plan, _grad_mode, build_case, step_fn
    from .workloads import WORKLOADS

    autotuner.Autotuner.run = _build_only(index, spec["workers"])
    dtype = getattr(torch, spec["dtype"])
    # Few rows: a build depends on dtypes, flags and divisibility by 16, not on M.
    rows = {kind: min(n, 256) for kind, n in spec["rows"].items()}
    plan = Plan("cuda", dtype, True, {}, rows, [], l2_bytes=0, seed=spec["seed"])
    phases: dict[str, float] = {}
    for name, width in spec["cases"]:
        phases.setdefault("optimize (build)", 0.0)
        case = build_case(plan, WORKLOADS[name], width, phases)
        for mode in MODES:
            with _grad_mode(mode):
                step_fn(case, case.variants["tritskip"], mode)()
    torch.cuda.synchronize()


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]), int(sys.argv[2]))
