"""Compile every default config of tritskip's Triton kernels for Hopper (sm_90), no GPU needed.

    python perf/build_check.py [--dtypes bf16,fp16] [--kernels forward,dx,dw] [--json PATH]

For each kernel, input dtype and ``triton.Config`` of ``default_configs()`` this runs Triton's
full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ptxas Triton ships) for a
``GPUTarget("cuda", 90, 32)`` and reports:

- ``regs``: registers per thread and ``spill`` bytes (spill stores + loads), from ``ptxas -v``
  run on the generated PTX with the flags Triton itself uses;
- ``smem``: shared memory the kernel needs (Triton's metadata), against the 227 KiB an sm_90
  block may use;
- ``wgmma``: whether the dot became Hopper's warp-group MMA (``wgmma`` in the PTX) rather than
  the older ``mma.sync``.

Launch-time specializations are mimicked: contiguous operands (each tensor's last stride is the
constant 1), 16-byte aligned pointers, sizes and leading strides divisible by 16. The epilogue
built is the package's main one (bias, residual, ReLU after the merge); ``--concat`` builds the
concatenation form instead. Exit status 1 when any config fails to compile or needs more
shared memory than sm_90 has; spills are flagged in the table (a tuning matter, not a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

SM90_SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90
FLOAT_ARGS = {"gamma_scalar", "alpha", "inner_slope", "outer_slope"}
DTYPES = {"bf16": "bf16", "fp16": "fp16"}


def epilogue_constexprs(concat: bool) -> dict:
    """Values of the kernels' constexpr flags for the epilogue being built."""
    return {
        "HAS_BIAS": True, "HAS_RESIDUAL": not concat, "HAS_GAMMA": False,
        "HAS_SHORTCUT": concat, "STORE_Z": False, "INNER": 1 if concat else 0,
        "OUTER": 0 if concat else 1, "DOT_IN_FP32": False, "INPUT_PRECISION": "ieee",
        "FROM_OUTPUT": True, "STORE_DR": not concat, "STORE_DB": True, "STORE_DGAMMA": False,
    }  # fmt: skip


def kernels() -> dict:
    """name -> (JITFunction, configs). Imported here: it needs Triton, and no interpreter."""
    os.environ.pop("TRITON_INTERPRET", None)
    from tritskip.kernels import linear_epilogue as fwd

    found = {"forward": (fwd.linear_epilogue_kernel, fwd.default_configs())}
    try:
        from tritskip.kernels import linear_epilogue_backward as bwd
    except ImportError:
        return _unwrap(found)
    found["dx"] = (bwd.linear_epilogue_dx_kernel, fwd.backward_configs())
    found["dw"] = (bwd.linear_epilogue_dw_kernel, fwd.backward_configs())
    return _unwrap(found)


def _unwrap(found: dict) -> dict:
    # An autotuned kernel wraps the @triton.jit function in .fn.
    return {name: (getattr(k, "fn", k), configs) for name, (k, configs) in found.items()}


def signature(fn, dtype: str, constexprs: dict, config_kwargs: dict):
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource``, launch-like."""
    names = list(fn.arg_names)
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    # The last stride of each tensor (stride_xm, stride_xk -> stride_xk) is 1 for contiguous
    # operands, which the JIT turns into a constant at launch.
    strides = [n for n in names if n.startswith("stride_")]
    groups: dict[str, list[str]] = {}
    for n in strides:
        groups.setdefault(n[len("stride_") : -1], []).append(n)
    unit = {g[-1] for g in groups.values() if len(g) == 2}
    sig, consts, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in constexpr_names:
            value = config_kwargs.get(n, constexprs.get(n))
            if value is None:
                raise KeyError(f"{fn.__name__}: no value for constexpr {n}; add it to the check")
            sig[n], consts[n] = "constexpr", value
        elif n in unit:
            sig[n], consts[n] = "constexpr", 1
        elif n.endswith("_ptr"):
            sig[n] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in FLOAT_ARGS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n in ("M", "N", "K") or n in strides:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


@dataclass
class Row:
    kernel: str
    index: int
    dtype: str
    config: str
    num_warps: int
    num_stages: int
    regs: int | None = None
    spill_bytes: int | None = None
    smem: int | None = None
    wgmma: bool | None = None
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        """Compiled and fits in sm_90's shared memory (spills are flagged, not failed)."""
        return not self.error and (self.smem or 0) <= SM90_SMEM_LIMIT


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` on ``ptx`` for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src, "-o",
             os.path.join(tmp, "k.o")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError(f"no register count in ptxas output:\n{log}")
    spills = int(stores.group(1) if stores else 0) + int(loads.group(1) if loads else 0)
    return int(regs.group(1)), spills


def build_one(kernel_name: str, dtype: str, index: int, concat: bool) -> Row:
    """Compile config ``index`` of ``kernel_name`` for sm_90 (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn, configs = kernels()[kernel_name]
    cfg = configs[index]
    label = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    row = Row(kernel_name, index, dtype, label, cfg.num_warps, cfg.num_stages)
    start = time.perf_counter()
    try:
        sig, consts, attrs = signature(fn, dtype, epilogue_constexprs(concat), cfg.kwargs)
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", 90, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )  # fmt: skip
        ptx = compiled.asm["ptx"]
        row.regs, row.spill_bytes = ptxas_usage(ptx)
        row.smem = int(compiled.metadata.shared)
        row.wgmma = "wgmma" in ptx
    except Exception as exc:  # report every config, then fail at the end
        row.error = _describe(exc)
    row.seconds = time.perf_counter() - start
    return row


def _describe(exc: BaseException) -> str:
    """One line: the innermost cause (Triton wraps the real error in CompilationErrors)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines[-1] if lines else '')[:300]}"


def toolchain_missing() -> str | None:
    """Why an sm_90 compile cannot run here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton's NVIDIA backend is not importable: {exc}"
    try:
        path = get_ptxas(90).path
    except Exception as exc:  # no bundled or configured ptxas
        return f"no ptxas for sm_90: {exc}"
    if not path or not os.path.exists(path):
        return f"ptxas not found at {path!r}"
    return None


def run(dtypes: list[str], names: list[str] | None, concat: bool, jobs: int,
        indices: list[int] | None = None) -> list[Row]:  # fmt: skip
    """Compile every (kernel, dtype, config), or only the configs at ``indices``."""
    available = kernels()
    names = names or list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise SystemExit(f"unknown kernels {unknown}; available: {list(available)}")
    tasks = [(n, d, i, concat) for n in names for d in dtypes
             for i in range(len(available[n][1])) if indices is None or i in indices]  # fmt: skip
    if jobs <= 1:
        return [build_one(*t) for t in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(build_one, *zip(*tasks, strict=True)))


def table(rows: list[Row]) -> str:
    header = ("kernel", "dtype", "BMxBNxBK", "warps", "stages", "regs", "spill B", "smem KiB",
              "wgmma", "s", "status")  # fmt: skip
    body = []
    for r in rows:
        if not r.ok:
            status = r.error or "FAILED: shared memory over the sm_90 limit"
        else:
            status = "spills" if r.spill_bytes else "ok"
        body.append((r.kernel, r.dtype, r.config, str(r.num_warps), str(r.num_stages),
                     "–" if r.regs is None else str(r.regs),
                     "–" if r.spill_bytes is None else str(r.spill_bytes),
                     "–" if r.smem is None else f"{r.smem / 1024:.1f}",
                     "–" if r.wgmma is None else ("yes" if r.wgmma else "no"),
                     f"{r.seconds:.1f}", status))  # fmt: skip
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16")
    parser.add_argument("--kernels", default=None, help="comma-separated: forward, dx, dw")
    parser.add_argument("--concat", action="store_true", help="build the concatenation form")
    parser.add_argument("--configs", default=None,
                        help="comma-separated indices into default_configs() (default: all)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    reason = toolchain_missing()
    if reason:
        print(f"build check skipped: {reason}")
        return 0
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = sorted(set(dtypes) - set(DTYPES))
    if bad:
        parser.error(f"unknown dtypes {bad}")
    names = args.kernels.split(",") if args.kernels else None
    start = time.perf_counter()
    indices = [int(i) for i in args.configs.split(",")] if args.configs else None
    rows = run(dtypes, names, args.concat, args.jobs, indices)
    print(table(rows))
    failed = [r for r in rows if not r.ok]
    spilling = sum(bool(r.spill_bytes) for r in rows)
    print(f"{len(rows)} builds for sm_90 in {time.perf_counter() - start:.0f} s; "
          f"{sum(bool(r.wgmma) for r in rows)} use wgmma; {spilling} spill; "
          f"{len(failed)} failed")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
