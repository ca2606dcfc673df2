"""The benchmark suite behind ``tritskip bench``: workloads, timers, the run and its report.

Importing it imports no timing or plotting dependency; those load when a run starts.
"""

from .runner import ANCHORS, MODES, CheckFailed, Plan, RunResult, make_plan, run
from .workloads import WORKLOADS, Workload

__all__ = [
    "ANCHORS",
    "MODES",
    "WORKLOADS",
    "CheckFailed",
    "Plan",
    "RunResult",
    "Workload",
    "make_plan",
    "run",
]
