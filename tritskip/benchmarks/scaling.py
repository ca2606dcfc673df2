"""How ``optimize()`` scales with model size: residual MLPs of growing depth.

The pass traces the model, matches every Linear site and rewrites it, so its cost should grow
linearly with the number of blocks. This reports the median wall time per depth, the cost per
100 blocks, and the ratio of the per-block cost at the largest depth to the smallest (about 1
when linear; well above 1 flags a quadratic step somewhere in the pass).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .workloads import ResidualMLP

__all__ = ["LINEAR_LIMIT", "time_optimize"]

# A per-block cost at the largest depth more than this many times the smallest is not linear.
LINEAR_LIMIT = 2.0


def time_optimize(
    depths: tuple[int, ...] = (10, 100, 1000),
    *,
    width: int = 32,
    runs: int = 3,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Median wall time of ``optimize(model)`` for residual MLPs of each depth (CPU, fp32)."""
    from ..graph_pass import optimize

    rows = []
    for depth in depths:
        torch.manual_seed(0)
        model = ResidualMLP(width, depth)
        times = []
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            optimize(model)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append({"blocks": depth, "seconds": seconds, "runs": len(times),
                     "ms_per_100_blocks": 1e3 * seconds * 100 / depth})  # fmt: skip
        if on_step is not None:
            on_step(depth)
    growth = None
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        growth = (large["seconds"] / large["blocks"]) / (small["seconds"] / small["blocks"])
    return {"width": width, "rows": rows, "per_block_growth": growth,
            "growth_between": [rows[0]["blocks"], rows[-1]["blocks"]] if rows else [],
            "linear": None if growth is None else growth <= LINEAR_LIMIT}  # fmt: skip
