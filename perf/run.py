"""Run the benchmark suite: ``python perf/run.py [--quick] [...]`` (same as ``tritskip bench``).

On a machine with a CUDA GPU this checks correctness, then times every workload against the
eager, addmm, torch.compile and torch.compile(max-autotune) anchors, within 5 minutes.
"""

import sys

from tritskip.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
