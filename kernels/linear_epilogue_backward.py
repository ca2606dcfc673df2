"""Backward kernels of the fused Linear epilogue.

For ``y = outer(gamma * inner(z) + alpha * r)`` with ``z = x @ W.T + b``::

    g_v = dy * outer'(v)          v = gamma * inner(z) + alpha * r
    g_z = gamma * g_v * inner'(z)
    dx = g_z @ W,  dW = g_z.T @ x,  db = sum_m g_z,  dr = alpha * g_v,  dgamma = sum_m g_v * inner(z)

``g_z`` is never written to memory: both matmul kernels rebuild it tile by tile from ``dy`` and
the saved tensor (the output ``y`` when the derivative is a function of it, else ``z`` and
``r``) as they load their operand. ``dx``'s kernel also writes ``dr`` (the programs of the first
K block), and ``dW``'s kernel accumulates ``db`` and ``dgamma`` in the same pass over M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .activations import activation_grad, apply_activation
from .linear_epilogue import _interpreting, _prune_configs, backward_configs, grouped_tile

__all__ = ["linear_epilogue_backward"]


@triton.jit
def _grad_z_tile(
    dy_ptrs, saved_ptrs, r_ptrs, gamma_row, gamma_scalar, alpha, inner_slope, outer_slope, mask,
    HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    INNER: tl.constexpr, OUTER: tl.constexpr,
):  # fmt: skip
    """(g_z, g_v, inner(z)) of one tile in fp32; ``gamma_row`` broadcasts along the tile's N axis."""
    dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    saved = tl.load(saved_ptrs, mask=mask, other=0.0).to(tl.float32)
    gamma = gamma_row if HAS_GAMMA else gamma_scalar
    if FROM_OUTPUT:
        # saved is y; only one of the two activations is not the identity.
        if INNER == 0:
            g_v = activation_grad(dy, saved, OUTER, outer_slope, True)
            g_z = g_v * gamma
        else:
            g_v = dy
            g_z = activation_grad(dy, saved, INNER, inner_slope, True)
        u = saved
    else:
        # saved is z: rebuild the merge v to differentiate the outer activation.
        u = apply_activation(saved, INNER, inner_slope)
        v = gamma * u
        if HAS_RESIDUAL:
            v += alpha * tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        g_v = activation_grad(dy, v, OUTER, outer_slope, False)
        g_z = activation_grad(g_v * gamma, saved, INNER, inner_slope, False)
    return g_z, g_v, u


@triton.autotune(
    configs=backward_configs(),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def linear_epilogue_dx_kernel(
    dy_ptr, saved_ptr, r_ptr, gamma_ptr, w_ptr, dx_ptr, dr_ptr,
    M, N, K,
    stride_dym, stride_savedm, stride_rm, stride_rn, stride_gamma,
    stride_wn, stride_wk, stride_dxm, stride_drm,
    dy_col, saved_col, gamma_scalar, alpha, inner_slope, outer_slope,
    HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    STORE_DR: tl.constexpr, INNER: tl.constexpr, OUTER: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Map the program id to a [BLOCK_M, BLOCK_K] tile of dx.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K

    # Loop over N: rebuild g_z for [BLOCK_M, BLOCK_N], multiply by W[BLOCK_N, BLOCK_K].
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < N
        mask = mask_m[:, None] & mask_n[None, :]
        gamma_row = tl.load(gamma_ptr + cols * stride_gamma, mask=mask_n, other=0.0).to(tl.float32)
        g_z, g_v, _ = _grad_z_tile(
            dy_ptr + offs_m[:, None] * stride_dym + (dy_col + cols)[None, :],
            saved_ptr + offs_m[:, None] * stride_savedm + (saved_col + cols)[None, :],
            r_ptr + offs_m[:, None] * stride_rm + cols[None, :] * stride_rn,
            gamma_row[None, :], gamma_scalar, alpha, inner_slope, outer_slope, mask,
            HAS_RESIDUAL, HAS_GAMMA, FROM_OUTPUT, INNER, OUTER,
        )  # fmt: skip
        if STORE_DR:
            if pid_k == 0:
                dr_ptrs = dr_ptr + offs_m[:, None] * stride_drm + cols[None, :]
                tl.store(dr_ptrs, (alpha * g_v).to(dr_ptr.dtype.element_ty), mask=mask)
        w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # Round g_z to the operand dtype, as eager's matmul on a low-precision g would see it.
        g = g_z.to(w_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)

    # Store once, rounded.
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.autotune(
    configs=backward_configs(),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def linear_epilogue_dw_kernel(
    dy_ptr, saved_ptr, r_ptr, gamma_ptr, x_ptr, dw_ptr, db_ptr, dgamma_ptr,
    M, N, K,
    stride_dym, stride_savedm, stride_rm, stride_rn, stride_gamma,
    stride_xm, stride_xk, stride_dwn,
    dy_col, saved_col, gamma_scalar, alpha, inner_slope, outer_slope,
    HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    STORE_DB: tl.constexpr, STORE_DGAMMA: tl.constexpr, INNER: tl.constexpr, OUTER: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Map the program id to a [BLOCK_N, BLOCK_K] tile of dW.
    pid_n, pid_k = grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_M)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    gamma_col = tl.load(gamma_ptr + offs_n * stride_gamma, mask=mask_n, other=0.0).to(tl.float32)

    # Loop over M: rebuild g_z transposed, [BLOCK_N, BLOCK_M], multiply by x[BLOCK_M, BLOCK_K];
    # the first K block also sums db and dgamma over the same rows.
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dgamma_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + offs_m).to(tl.int64)
        mask_m = rows < M
        mask = mask_n[:, None] & mask_m[None, :]
        g_z, g_v, u = _grad_z_tile(
            dy_ptr + rows[None, :] * stride_dym + (dy_col + offs_n)[:, None],
            saved_ptr + rows[None, :] * stride_savedm + (saved_col + offs_n)[:, None],
            r_ptr + rows[None, :] * stride_rm + offs_n[:, None] * stride_rn,
            gamma_col[:, None], gamma_scalar, alpha, inner_slope, outer_slope, mask,
            HAS_RESIDUAL, HAS_GAMMA, FROM_OUTPUT, INNER, OUTER,
        )  # fmt: skip
        if STORE_DB:
            db_acc += tl.sum(g_z, axis=1)
        if STORE_DGAMMA:
            dgamma_acc += tl.sum(g_v * u, axis=1)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = g_z.to(x_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(g, x, acc, input_precision=INPUT_PRECISION)

    # Store dW once; db and dgamma from the programs of the first K block.
    dw_ptrs = dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if pid_k == 0:
        if STORE_DB:
            tl.store(db_ptr + offs_n, db_acc.to(db_ptr.dtype.element_ty), mask=mask_n)
        if STORE_DGAMMA:
            tl.store(dgamma_ptr + offs_n, dgamma_acc, mask=mask_n)


def linear_epilogue_backward(
    grad_out: torch.Tensor,
    saved: torch.Tensor,
    from_output: bool,
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    gamma: torch.Tensor | None,
    gamma_scalar: float,
    alpha: float,
    inner,
    outer,
    y_col: int,
    needs: tuple[bool, bool, bool, bool, bool],
    residual_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dW, db, dr, dgamma)`` of 2-D operands; ``None`` where not needed.

    ``saved`` is the op's 2-D output (``from_output``; the Linear's columns start at ``y_col``)
    or ``z``. ``dgamma`` has ``gamma``'s shape. ``needs`` flags dx, dW, db, dr, dgamma. ``dr``
    is written in ``residual_dtype`` (default ``x.dtype``), the other gradients in their input's.
    """
    m, k = x.shape
    n = weight.shape[0]
    need_dx, need_dw, need_db, need_dr, need_dgamma = needs
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dw = torch.empty((n, k), device=x.device, dtype=weight.dtype) if need_dw else None
    db = torch.empty((n,), device=x.device, dtype=x.dtype) if need_db else None
    dr_dtype = residual_dtype or x.dtype
    dr = torch.empty((m, n), device=x.device, dtype=dr_dtype) if need_dr else None
    dgamma = torch.empty((n,), device=x.device, dtype=torch.float32) if need_dgamma else None
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    saved_col = y_col if from_output else 0
    if m == 0 or k == 0 or n == 0:
        for t in (dx, dw, db, dr, dgamma):
            if t is not None:
                t.zero_()
    else:
        dummy = grad_out
        r = residual if residual is not None else dummy
        gamma_stride = 0 if gamma is None or gamma.dim() == 0 else gamma.stride(0)
        common = {
            "HAS_RESIDUAL": residual is not None,
            "HAS_GAMMA": gamma is not None,
            "FROM_OUTPUT": from_output,
            "INNER": inner.code,
            "OUTER": outer.code,
            "DOT_IN_FP32": _interpreting() and x.dtype == torch.bfloat16,
            "INPUT_PRECISION": "tf32"
            if x.dtype == torch.float32
            and torch.backends.cuda.matmul.allow_tf32
            and not _interpreting()
            else "ieee",
        }
        scalars = (y_col, saved_col, float(gamma_scalar), float(alpha),
                   float(inner.negative_slope), float(outer.negative_slope))  # fmt: skip
        g = gamma if gamma is not None else dummy
        if need_dx or need_dr:
            # dr alone still runs this kernel: its first-K programs are the ones that write dr.
            dx_buf = dx if dx is not None else torch.empty_like(x)

            def grid_dx(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

            wrap_triton(linear_epilogue_dx_kernel)[grid_dx](
                grad_out, saved, r, g, weight, dx_buf, dr if dr is not None else dummy,
                m, n, k,
                grad_out.stride(0), saved.stride(0), r.stride(0), r.stride(1), gamma_stride,
                weight.stride(0), weight.stride(1), dx_buf.stride(0),
                dr.stride(0) if dr is not None else 0,
                *scalars, STORE_DR=need_dr, **common,
            )  # fmt: skip
        if need_dw or need_db or need_dgamma:
            dw_buf = dw if dw is not None else torch.empty((n, k), device=x.device, dtype=x.dtype)

            def grid_dw(meta):
                return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)

            wrap_triton(linear_epilogue_dw_kernel)[grid_dw](
                grad_out, saved, r, g, x, dw_buf,
                db if db is not None else dummy, dgamma if dgamma is not None else dummy,
                m, n, k,
                grad_out.stride(0), saved.stride(0), r.stride(0), r.stride(1), gamma_stride,
                x.stride(0), x.stride(1), dw_buf.stride(0),
                *scalars, STORE_DB=need_db, STORE_DGAMMA=need_dgamma, **common,
            )  # fmt: skip
    if dgamma is not None:
        dgamma = (dgamma.sum() if gamma.dim() == 0 else dgamma).to(gamma.dtype)
    return dx, dw, db, dr, dgamma
