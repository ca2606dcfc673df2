"""The sm_90 build check (perf/build_check.py) on one forward config, without a GPU.

It runs in a subprocess: the test session imports Triton with ``TRITON_INTERPRET=1``, under
which ``@triton.jit`` functions cannot be compiled for a GPU target. Skipped when Triton's
NVIDIA backend or its ptxas is unavailable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "perf" / "build_check.py"


def _toolchain_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton's NVIDIA backend is not importable: {exc}"
    try:
        path = get_ptxas(90).path
    except Exception as exc:
        return f"no ptxas for sm_90: {exc}"
    return None if path and os.path.exists(path) else f"ptxas not found at {path!r}"


pytestmark = pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))


def _wgmma_config() -> int:
    """Index of the smallest 4-warp tile with 64+ rows: large enough for wgmma, quick to build."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import json\nfrom tritskip.kernels.linear_epilogue import default_configs as d\n"
         "print(json.dumps([(c.kwargs['BLOCK_M'], c.kwargs['BLOCK_N'], c.num_warps) "
         "for c in d()]))"],
        capture_output=True, text=True, check=True, env=_env(), cwd=ROOT,
    )  # fmt: skip
    configs = json.loads(out.stdout.strip().splitlines()[-1])
    candidates = [i for i, (bm, _, warps) in enumerate(configs) if bm >= 64 and warps == 4]
    return min(candidates, key=lambda i: configs[i][0] * configs[i][1])


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_forward_kernel_builds_for_sm90(tmp_path):
    index = _wgmma_config()
    report = tmp_path / "build.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kernels", "forward", "--dtypes", "bf16",
         "--configs", str(index), "--jobs", "1", "--json", str(report)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert report.exists(), f"build check wrote no report:\n{proc.stdout}\n{proc.stderr}"
    (row,) = json.loads(report.read_text())
    name = f"config {row['index']} ({row['config']}, {row['num_warps']} warps)"
    assert not row["error"], f"{name} did not compile for sm_90: {row['error']}"
    assert 0 < row["regs"] <= 255, f"{name}: {row}"
    assert row["smem"] <= 232_448, f"{name}: shared memory {row['smem']} B"
    assert row["wgmma"], f"{name}: the dot did not become wgmma"
    assert proc.returncode == 0, proc.stdout
    # Spills are reported by the script (a tuning matter), not failed here.
