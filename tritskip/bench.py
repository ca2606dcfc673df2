"""``tritskip bench``: the kernel- and model-level benchmark suite in one command.

On a CPU it times with pytest-benchmark; on a CUDA GPU with ``triton.testing.do_bench``, after
checking every fused result against a float64 oracle. Results go to
``<out>/<date>-<device-name>/`` as JSON, markdown and a PNG plot; the short ratio table is
printed last. ``--quick`` runs a reduced plan (under a minute on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "main"]


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _str_list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true",
                        help="reduced plan: fewer widths, shorter timing")  # fmt: skip
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu")  # fmt: skip
    parser.add_argument("--out", default="perf/results",
                        help="results root; a <date>-<device-name> folder is made in it")  # fmt: skip
    parser.add_argument("--workloads", type=_str_list, default=None,
                        help="comma-separated subset of the workloads")  # fmt: skip
    parser.add_argument("--widths", type=_int_list, default=None,
                        help="comma-separated widths for every workload (overrides the plan)")  # fmt: skip
    parser.add_argument("--rows", type=int, default=None, help="rows (batch x tokens) per input")
    parser.add_argument("--anchors", type=_str_list, default=None,
                        help="comma-separated subset of eager,addmm,compile,max-autotune")  # fmt: skip
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile anchors")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting torch.compile work past this many seconds "
                        "(default: 255 on CUDA, 110 with --quick; 40 for a quick CPU run, else none; "
                        "0 disables)")  # fmt: skip
    parser.add_argument("--scaling-depths", type=_int_list, default=None,
                        help="residual-MLP depths for timing optimize() (default 10,100,1000)")  # fmt: skip
    parser.add_argument("--no-scaling", action="store_true",
                        help="skip timing optimize() against depth")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch; 1 (default) gives ratios that hold on a "
                        "busy machine, 0 keeps torch's own choice")  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the suite; 0 on success, 1 when a correctness check fails."""
    parser = add_arguments(argparse.ArgumentParser(prog="tritskip bench", description=__doc__))
    args = parser.parse_args(argv)
    return run_from_args(args, argv)


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import torch

    from .benchmarks import CheckFailed, make_plan, run
    from .benchmarks.report import print_summary, write_results

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("tritskip bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    anchors = args.anchors
    if args.no_compile:
        anchors = [a for a in (anchors or ["eager", "addmm"]) if a in ("eager", "addmm")]
    plan = make_plan(device, args.quick, workloads=args.workloads, widths=args.widths,
                     rows=args.rows, anchors=anchors, budget_s=args.budget_s,
                     scaling_depths=() if args.no_scaling else args.scaling_depths)  # fmt: skip
    cases = len(plan.cases())
    where = device if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"tritskip bench: {where}, {str(plan.dtype).replace('torch.', '')}, {cases} cases, "
          f"anchors {', '.join(plan.anchors)}" + (" (quick)" if plan.quick else ""))  # fmt: skip
    try:
        result = run(plan, argv=list(sys.argv[1:] if argv is None else argv),
                     progress=not args.no_progress)  # fmt: skip
    except CheckFailed as exc:
        from .benchmarks.runner import collect_meta

        meta = collect_meta(plan, argv)
        folder = Path(args.out) / f"{meta['date']}-{meta['device_name']}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "check_failed.txt").write_text(f"{exc}\n")
        print(f"tritskip bench: CORRECTNESS CHECK FAILED, nothing timed "
              f"(also in {folder / 'check_failed.txt'}).\n{exc}", file=sys.stderr)  # fmt: skip
        return 1
    start = time.perf_counter()
    paths = write_results(result, args.out, make_plot=not args.no_plot)
    result.phases["report"] = time.perf_counter() - start

    print("phase times:")
    for phase, seconds in result.phases.items():
        print(f"  {phase:<38} {seconds:8.1f} s")
    skipped = sorted({f"{m.variant}: {m.reason}" for m in result.measurements
                      if m.status != "ok"})  # fmt: skip
    for line in skipped:
        print(f"  not measured — {line}")
    if result.scaling:
        sc = result.scaling
        per = ", ".join(f"{r['blocks']}: {r['ms_per_100_blocks']:.1f}" for r in sc["rows"])
        print(f"optimize() ms per 100 blocks ({per})", end="")
        if sc["per_block_growth"] is not None:
            a, b = sc["growth_between"]
            verdict = "linear" if sc["linear"] else "NOT linear"
            print(f"; per-block cost {b} vs {a} blocks: {sc['per_block_growth']:.2f} ({verdict})")
        else:
            print()
    print("written: " + ", ".join(str(p) for p in paths.values()))
    print()
    print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
