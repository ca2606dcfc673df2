"""Forward kernel of the fused Linear epilogue and its launch wrapper.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``z = x @ W.T + b`` with fp32
accumulation, applies ``outer(gamma * inner(z) + alpha * r)`` while the tile is in registers,
and stores it once, rounded to the output dtype. In concat mode the tile lands in its column
slice of the ``[M, N + S]`` buffer and the programs of the same row block also copy the
shortcut's ``[BLOCK_M, S]`` rows into the other slice, so ``torch.cat`` costs no extra pass.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .activations import apply_activation

__all__ = [
    "backward_configs",
    "default_configs",
    "linear_epilogue_forward",
    "linear_epilogue_kernel",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(shapes) -> list[triton.Config]:
    if _interpreting():
        # Every config would run under the interpreter; 16 keeps odd-size tails exercised.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in shapes
    ]


def default_configs() -> list[triton.Config]:
    """Tile shapes the forward autotuner picks from, per (M, N, K, S).

    128x128 is the usual Hopper tile for compute-bound widths; the narrower BLOCK_N = 64/32
    tiles serve the memory-bound widths (N <= 256) this package targets, where more row blocks
    in flight matter more than reusing x along N. Every config was compiled for sm_90 in bf16
    and fp16 (``perf/build_check.py``): none spills and every dot becomes ``wgmma``. Dropped
    for that reason: 128x256x64/8 warps (548 B of spills), 128x128x32/4 warps (160 B) and
    64x32x32/2 warps (no wgmma with 2 warps).
    """
    return _configs(
        [
            # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
            (128, 128, 64, 4, 8),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 32, 64, 4, 4),
            (64, 64, 64, 4, 4),
        ]
    )


def backward_configs() -> list[triton.Config]:
    """Tiles of the dX and dW kernels, which hold more live values than the forward.

    From the same sm_90 build check: 128x128x64/8 warps (252 and 186 registers) and
    64x64x64/4 warps build without spills and with ``wgmma`` for both; the forward's other
    tiles spill in dX (128x64x64) or dW (64x128x64), or lose ``wgmma`` in dW (128x32x64).
    """
    return _configs([(128, 128, 64, 4, 8), (64, 64, 64, 4, 4)])


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles much wider than the problem: a BLOCK_N of 256 for N = 32 only wastes lanes."""
    n, k = named_args["N"], named_args["K"]
    max_n = max(32, triton.next_power_of_2(n))
    max_k = max(32, triton.next_power_of_2(k))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max_n and c.kwargs["BLOCK_K"] <= max_k]
    return kept or configs[-1:]


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 GROUP: tl.constexpr):  # fmt: skip
    """(row block, column block) of program ``pid``, both int64, in grouped order.

    GROUP row blocks run side by side, so the column operand's tiles they share are still in
    L2 when the next of them loads them. int64 keeps ``block * stride`` from overflowing.
    """
    num_row_blocks = tl.cdiv(rows, BLOCK_ROWS)
    num_col_blocks = tl.cdiv(cols, BLOCK_COLS)
    pids_per_group = GROUP * num_col_blocks
    first_row_block = (pid // pids_per_group) * GROUP
    group_size = min(num_row_blocks - first_row_block, GROUP)
    row_block = first_row_block + (pid % pids_per_group) % group_size
    col_block = (pid % pids_per_group) // group_size
    return row_block.to(tl.int64), col_block.to(tl.int64)


@triton.autotune(
    configs=default_configs(),
    key=["M", "N", "K", "S"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def linear_epilogue_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, r_ptr, gamma_ptr, s_ptr, out_ptr, z_ptr,
    # sizes
    M, N, K, S,
    # strides (the column stride of out and z is 1)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
    stride_gamma, stride_sm, stride_sn, stride_om, stride_zm,
    # epilogue scalars
    y_col, s_col, gamma_scalar, alpha, inner_slope, outer_slope,
    # constexpr flags
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr, STORE_Z: tl.constexpr,
    INNER: tl.constexpr, OUTER: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Map the program id to a tile; GROUP_M row blocks share W tiles while they are in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)

    # Offsets and masks of the tile and the first K block.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk

    # K loop: fp32 accumulator, masked K tail.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue in fp32: bias, inner activation, scale, residual, outer activation.
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STORE_Z:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :]
        tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask)
    acc = apply_activation(acc, INNER, inner_slope)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + offs_n * stride_gamma, mask=mask_n, other=0.0)
        acc = acc * gamma.to(tl.float32)[None, :]
    else:
        acc = acc * gamma_scalar
    if HAS_RESIDUAL:
        r_ptrs = r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += alpha * tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc = apply_activation(acc, OUTER, outer_slope)

    # Store once, rounded to the output dtype.
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + (y_col + offs_n)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    # Concat mode: this program also copies its share of the shortcut's columns.
    if HAS_SHORTCUT:
        for c0 in range(pid_n * BLOCK_N, S, num_pid_n * BLOCK_N):
            offs_c = c0 + tl.arange(0, BLOCK_N)
            mask_c = mask_m[:, None] & (offs_c < S)[None, :]
            src = s_ptr + offs_m[:, None] * stride_sm + offs_c[None, :] * stride_sn
            tile = tl.load(src, mask=mask_c)
            dst = out_ptr + offs_m[:, None] * stride_om + (s_col + offs_c)[None, :]
            tl.store(dst, tile.to(out_ptr.dtype.element_ty), mask=mask_c)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 matmuls follow torch's own TF32 switch, so results agree with eager's F.linear.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def linear_epilogue_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor | None,
    shortcut: torch.Tensor | None,
    gamma_scalar: float,
    alpha: float,
    inner,
    outer,
    shortcut_first: bool,
    save_z: bool,
    out: torch.Tensor | None = None,
    out_col: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel on 2-D operands (validated by the caller); returns ``(out, z)``.

    Operands are read through their strides, so transposed or sliced 2-D views are not copied.
    ``inner``/``outer`` are :class:`tritskip.epilogue.Activation` objects. ``out``, when
    given, is the caller's 2-D buffer (unit column stride) of ``[M, N + S]``, filled in the
    same layout as a new one would be; with ``out_col`` (and no shortcut) the result goes into
    its columns ``out_col : out_col + N`` instead: how a dense chain fills one buffer.
    ``out_dtype`` (default ``x.dtype``) may be wider than the inputs, as eager's promotion gives
    for a bf16 matmul merged with an fp32 residual under autocast; ``z`` keeps ``x.dtype``.
    """
    m, k = x.shape
    n = weight.shape[0]
    s = 0 if shortcut is None else shortcut.shape[1]
    if out is None:
        out = torch.empty((m, n + s), device=x.device, dtype=out_dtype or x.dtype)
    elif out.dim() != 2 or out.stride(1) != 1 or out.shape[0] != m:
        raise ValueError(
            f"out buffer of shape {tuple(out.shape)} and strides {out.stride()} cannot take "
            f"{m} rows (needs a 2-D buffer with unit column stride)"
        )
    if out_col is None:
        if out.shape[1] != n + s:
            raise ValueError(f"out buffer has {out.shape[1]} columns, expected {n + s}")
        y_col, s_col = (s, 0) if shortcut_first else (0, n)
    else:
        if shortcut is not None or out_col + n > out.shape[1]:
            raise ValueError(
                f"columns {out_col}:{out_col + n} do not fit an out buffer of shape "
                f"{tuple(out.shape)}, or a shortcut was given with out_col"
            )
        y_col, s_col = out_col, 0
    z = torch.empty((m, n), device=x.device, dtype=x.dtype) if save_z else None
    if m == 0:
        return out, z
    if gamma is not None and gamma.dim() == 0:
        gamma_stride = 0
    else:
        gamma_stride = 0 if gamma is None else gamma.stride(0)
    # A dummy pointer for absent operands; the constexpr flags keep it from being read.
    dummy = out
    r = residual if residual is not None else dummy
    sc = shortcut if shortcut is not None else dummy

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    wrap_triton(linear_epilogue_kernel)[grid](
        x, weight, bias if bias is not None else dummy, r,
        gamma if gamma is not None else dummy, sc, out, z if z is not None else dummy,
        m, n, k, s,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        r.stride(0), r.stride(1), gamma_stride, sc.stride(0), sc.stride(1),
        out.stride(0), z.stride(0) if z is not None else 0,
        y_col, s_col, float(gamma_scalar), float(alpha),
        float(inner.negative_slope), float(outer.negative_slope),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_GAMMA=gamma is not None, HAS_SHORTCUT=shortcut is not None, STORE_Z=save_z,
        INNER=inner.code, OUTER=outer.code,
        DOT_IN_FP32=_interpreting() and x.dtype == torch.bfloat16,
        INPUT_PRECISION=_input_precision(x.dtype),
    )  # fmt: skip
    return out, z
