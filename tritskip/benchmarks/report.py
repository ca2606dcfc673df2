"""Results on disk and on screen: ``results.json``, ``results.md``, ``speedup.png``, a table.

The folder is ``<out>/<date>-<device-name>/``. The JSON holds everything measured; the
markdown holds the same in tables a reader can paste; the plot shows the speed-up against
width, one line per anchor, one panel per workload and mode.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .runner import ANCHORS, MODES, RunResult
from .workloads import WORKLOADS

__all__ = ["print_summary", "result_dir", "to_json", "write_results"]


def result_dir(result: RunResult, out: str | Path) -> Path:
    return Path(out) / f"{result.meta['date']}-{result.meta['device_name']}"


def to_json(result: RunResult) -> dict:
    return {
        "meta": result.meta,
        "floors": result.floors,
        "phases_s": dict(result.phases),
        "checks": result.checks,
        "summary": result.summary(),
        "ratios": result.ratios(),
        "measurements": [m.as_dict(result.floors) for m in result.measurements],
        "optimize_scaling": result.scaling,
        "skipped_cases": result.skipped_cases,
    }


def _fmt(value, spec: str = ".3g", empty: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def markdown(result: RunResult) -> str:
    meta, floors = result.meta, result.floors
    data = to_json(result)
    lines = [
        f"# tritskip benchmark: {meta.get('gpu') or meta['device_name']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, triton {meta.get('triton') or 'absent'}, tritskip "
        f"{meta['tritskip']} (commit {meta.get('git_commit') or 'unknown'}), dtype "
        f"{meta['dtype']}, rows {meta['rows']}, {meta['threads']} threads"
        + (", quick run" if meta["quick"] else "")
        + ".",
        "",
        "Ratios are anchor time / tritskip time (median of the timed runs; above 1 means "
        "tritskip is faster); min / median / max are over the widths measured.",
        "",
        "## Speed-up of tritskip",
        "",
    ]
    summary = [[WORKLOADS[r["workload"]].title, r["mode"], r["anchor"], _fmt(r["min"], ".2f"),
                _fmt(r["median"], ".2f"), _fmt(r["max"], ".2f"), str(r["n"])]
               for r in data["summary"]]  # fmt: skip
    lines += _table(["workload", "mode", "anchor", "min", "median", "max", "widths"], summary)

    lines += ["## Machine rates (measured in this run)", ""]
    if floors:
        lines += [
            f"- copy bandwidth: {floors['bandwidth_bytes'] / 1e9:.1f} GB/s "
            f"({floors['copy_bytes'] / 2**20:.0f} MiB moved)",
            f"- matmul rate: {floors['matmul_flops'] / 1e12:.2f} TFLOP/s "
            f"({floors['matmul_n']}^3, {floors['matmul_dtype'].replace('torch.', '')})",
        ]
        if floors.get("is_floor", True):
            lines += ["- floor = max(FLOPs / matmul rate, minimum bytes / bandwidth); `floor %` "
                      "is floor time / measured time"]  # fmt: skip
        else:
            lines += [f"- {floors.get('note', 'no floor on this device')}; `floor %` is not "
                      "reported, TFLOP/s and GB/s (minimum bytes / time) are"]  # fmt: skip
        lines.append("")

    lines += ["## Every measurement", ""]
    ratio = {(r["workload"], r["width"], r["mode"], r["anchor"]): r["ratio"]
             for r in data["ratios"]}  # fmt: skip
    rows = []
    for m in data["measurements"]:
        t = m["time_ms"] or {}
        key = (m["workload"], m["width"], m["mode"], m["variant"])
        status = m["status"] if m["status"] == "ok" else f"{m['status']}: {m['reason']}"
        rows.append([
            m["workload"], str(m["width"]), m["mode"], m["variant"],
            _fmt(t.get("median"), ".4g"), _fmt(t.get("iqr"), ".2g"), _fmt(t.get("min"), ".4g"),
            _fmt(t.get("max"), ".4g"), _fmt(ratio.get(key), ".2f"), _fmt(m["peak_mb"], ".1f"),
            _fmt(m.get("tflops"), ".3g"), _fmt(m.get("gbps"), ".3g"),
            _fmt(None if m.get("floor_fraction") is None else 100 * m["floor_fraction"], ".1f"),
            _fmt(m["compile_s"], ".1f"), status,
        ])  # fmt: skip
    lines += _table(["workload", "width", "mode", "variant", "median ms", "IQR ms", "min ms",
                     "max ms", "anchor/tritskip", "peak MB", "TFLOP/s", "GB/s", "floor %",
                     "compile s", "status"], rows)  # fmt: skip

    if result.scaling:
        sc = result.scaling
        lines += [f"## optimize() on residual MLPs (width {sc['width']})", ""]
        lines += _table(["blocks", "median s", "ms per 100 blocks", "runs"],
                        [[str(r["blocks"]), _fmt(r["seconds"], ".4f"),
                          _fmt(r["ms_per_100_blocks"], ".2f"), str(r["runs"])]
                         for r in sc["rows"]])  # fmt: skip
        if sc.get("per_block_growth") is not None:
            a, b = sc["growth_between"]
            lines += [f"Per-block cost at {b} blocks / at {a} blocks: "
                      f"{sc['per_block_growth']:.2f} ({'linear' if sc['linear'] else 'NOT linear'})."
                      , ""]  # fmt: skip

    if data["skipped_cases"]:
        lines += ["## Cases not run", ""]
        lines += [f"- {c['workload']} at width {c['width']}: {c['reason']}"
                  for c in data["skipped_cases"]] + [""]  # fmt: skip

    lines += ["## Phase times", ""]
    lines += _table(["phase", "seconds"],
                    [[k, _fmt(v, ".1f")] for k, v in data["phases_s"].items()])  # fmt: skip

    worst = max((c["worst_fraction_of_allowed"] for c in data["checks"]), default=0.0)
    lines += ["## Correctness", "",
              f"{len(data['checks'])} cases checked against a float64 oracle before timing "
              "(output and every gradient; allowed error 2x eager's plus a small tolerance); "
              f"largest error used {100 * worst:.0f}% of its allowance.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(result: RunResult, path: Path) -> Path | None:
    """Speed-up against width, one line per anchor; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ratios = result.ratios()
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in ratios)]
    if not workloads:
        return None
    fig, axes = plt.subplots(len(MODES), len(workloads), squeeze=False,
                             figsize=(3.2 * len(workloads), 3.0 * len(MODES)))  # fmt: skip
    for i, mode in enumerate(MODES):
        for j, wl in enumerate(workloads):
            ax = axes[i][j]
            for anchor in ANCHORS:
                pts = sorted((r["width"], r["ratio"]) for r in ratios
                             if (r["workload"], r["mode"], r["anchor"]) == (wl, mode, anchor))  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=anchor)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{wl}\n{mode}", fontsize=9)
            if i == len(MODES) - 1:
                ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel("anchor time / tritskip time")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    meta = result.meta
    fig.suptitle(f"tritskip speed-up, {meta.get('gpu') or meta['device_name']}, "
                 f"{meta['dtype']}, {meta['date']}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(result: RunResult, out: str | Path, *, make_plot: bool = True) -> dict:
    """Write results.json, results.md and speedup.png; return the paths written."""
    folder = result_dir(result, out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "results.json", "markdown": folder / "results.md"}
    paths["json"].write_text(json.dumps(to_json(result), indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown(result))
    if make_plot:
        png = plot(result, folder / "speedup.png")
        if png is not None:
            paths["plot"] = png
    return paths


def print_summary(result: RunResult, echo=print) -> None:
    """The short table: one row per workload and mode, one column per anchor."""
    summary = result.summary()
    anchors = [a for a in ANCHORS if any(r["anchor"] == a for r in summary)]
    cells = {(r["workload"], r["mode"], r["anchor"]): r for r in summary}
    header = ["workload", "mode", *[f"{a} / tritskip" for a in anchors]]
    body = []
    for wl in WORKLOADS:
        for mode in MODES:
            if not any((wl, mode, a) in cells for a in anchors):
                continue
            row = [wl, mode]
            for a in anchors:
                r = cells.get((wl, mode, a))
                row.append("–" if r is None else
                           f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})")  # fmt: skip
            body.append(row)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(header)]  # fmt: skip
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    echo(line)
    echo("-" * len(line))
    for r in body:
        echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    echo("speed-up of tritskip = anchor time / tritskip time: median (min–max) over widths")
