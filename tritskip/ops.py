"""The fused Linear-epilogue op: ``torch.library`` registration, dispatch and autograd.

``tritskip::linear_epilogue`` computes ``y = outer(gamma * inner(x @ W.T + b) + alpha * r)``
(see :mod:`tritskip.epilogue`), or in concat mode writes ``gamma * inner(x @ W.T + b)`` and a
shortcut tensor side by side into one buffer. It returns ``(out, z)`` where ``z`` is the
pre-activation ``x @ W.T + b`` when the backward needs it and an empty tensor otherwise.

Dtypes follow eager type promotion: ``x``, ``weight`` and ``bias`` share the compute dtype
(``z`` has it); ``out`` has the dtype eager's ``gamma * u + r`` or ``torch.cat`` would give, so
a bf16 matmul with an fp32 residual stream (what autocast produces) returns fp32.

Dispatch of the forward:

- CUDA tensors of dtype fp32/fp16/bf16 run the Triton kernel.
- CPU tensors run the Triton kernel through Triton's interpreter when ``TRITON_INTERPRET=1``
  (how the kernels are tested without a GPU), else a PyTorch path that is as fused as PyTorch
  allows: one ``addmm`` straight into the output (or its slice of the concat buffer), then
  in-place epilogue steps.

Under ``torch.compile`` the op is decomposed (it is a ``torch.library.triton_op`` when Triton
is installed): Inductor sees the Triton kernel launches, or the PyTorch path's aten ops, instead
of an opaque call; ``torch.export`` keeps it as one ``tritskip.linear_epilogue`` node. A traced
forward or backward takes the Triton kernels only when their launches can be captured (each
wrapped in ``torch.library.wrap_triton``); otherwise, and always under the interpreter, whose
kernels need real data, it takes the PyTorch path and Inductor generates the fused code itself.

The backward uses PyTorch matmuls on ``g = dy * act'(.)``. ``torch.vmap`` is supported by a
batching rule.

Use :func:`tritskip.functional.fused_linear` rather than this module directly: it validates,
falls back to the eager composition where fusing would change semantics, and returns one tensor.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from .epilogue import Activation, activation_backward, apply_activation, output_determines_grad

__all__ = [
    "force_backend",
    "linear_epilogue",
    "out_dtype",
    "runs_composite",
    "triton_available",
    "uses_triton",
]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_forced_backend: str | None = None


# Both answers are read once and kept in module globals rather than functools.cache, whose
# wrapper torch.compile warns about each time it traces a call to it.
_triton_available: bool | None = None
_interpret: bool | None = None


def triton_available() -> bool:
    """Whether ``triton`` imports; without it only the PyTorch path exists."""
    global _triton_available
    if _triton_available is None:
        try:
            import triton  # noqa: F401

            _triton_available = True
        except ImportError:
            _triton_available = False
    return _triton_available


def _interpreting() -> bool:
    # Read once, like triton.jit, which picks the interpreter when a kernel is defined.
    global _interpret
    if _interpret is None:
        _interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _interpret


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Within the block, run the forward on one backend regardless of device and mode.

    ``"triton"``: the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before
    Triton is first imported); ``"torch"``: the op with its PyTorch path; ``"composite"``: no op,
    the in-place eager composition of :mod:`tritskip.composite`. For tests and benchmarks.
    """
    global _forced_backend
    if name not in ("torch", "triton", "composite"):
        raise ValueError(f"backend must be 'torch', 'triton' or 'composite', got {name!r}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the forward of an input like ``x`` runs the Triton kernel."""
    if x.dtype not in _TRITON_DTYPES or not triton_available():
        return False
    if _forced_backend is not None:
        return _forced_backend == "triton"
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _interpreting()


def runs_composite(x: torch.Tensor) -> bool:
    """Whether an input like ``x`` skips the op for the in-place eager composition.

    So it does wherever no kernel runs and nothing traces: the op's dispatch costs more than
    the composition on CPU (see :mod:`tritskip.composite`). Under ``torch.compile`` and
    ``torch.export`` the op stays, so graphs hold one node per site. Called on every forward,
    hence the cheap checks first.
    """
    if _forced_backend is not None:
        return _forced_backend == "composite"
    if (x.is_cuda or (x.is_cpu and _interpreting())) and uses_triton(x):
        return False
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def out_dtype(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    shortcut: torch.Tensor | None,
) -> torch.dtype:
    """The dtype eager gives ``gamma * u + r`` (or ``cat([gamma * u, s])``) with ``u`` like ``x``.

    A 0-d ``gamma`` does not promote (it counts as a scalar); a per-channel one does.
    """
    dtype = x.dtype
    if gamma is not None and gamma.dim() > 0:
        dtype = torch.promote_types(dtype, gamma.dtype)
    for t in (residual, shortcut):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _torch_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor | None,
    shortcut: torch.Tensor | None,
    gamma_scalar: float,
    alpha: float,
    inner: Activation,
    outer: Activation,
    shortcut_first: bool,
    out: torch.Tensor,
    z: torch.Tensor | None,
) -> None:
    """2-D PyTorch path into the buffers ``out`` and ``z``: one addmm, then in-place steps.

    Only ``out=`` and in-place calls, which autocast leaves alone, so an enclosing autocast
    region cannot change the dtypes chosen here. With an output dtype wider than ``x``'s the
    matmul goes to ``z`` (or a scratch buffer) first and is widened into the output once.
    """
    n = weight.shape[0]
    if shortcut is not None:
        s = shortcut.shape[1]
        y, short = (out[:, s:], out[:, :s]) if shortcut_first else (out[:, :n], out[:, n:])
        short.copy_(shortcut)
    else:
        y = out
    mm_out = y
    if out.dtype != x.dtype:  # a wider output: the matmul lands in z (or scratch) first
        mm_out = z if z is not None else x.new_empty(x.shape[0], n)
    if bias is not None:
        torch.addmm(bias, x, weight.t(), out=mm_out)
    else:
        torch.mm(x, weight.t(), out=mm_out)
    if mm_out is not y:
        y.copy_(mm_out)
    elif z is not None:
        z.copy_(y)
    apply_activation(y, inner.name, inner.negative_slope, inplace=True)
    if gamma is not None:
        y.mul_(gamma)
    elif gamma_scalar != 1.0:
        y.mul_(gamma_scalar)
    if residual is not None:
        y.add_(residual, alpha=alpha)
    apply_activation(y, outer.name, outer.negative_slope, inplace=True)


def _forward(x, weight, bias, residual, gamma, shortcut, gamma_scalar, alpha, inner,
             inner_slope, outer, outer_slope, shortcut_first, save_z):  # fmt: skip
    """Flatten leading dims, run the Triton kernel or the PyTorch path, restore the shape.

    Leading batch dims of ``x`` (and of ``residual``/``shortcut``) are flattened with
    ``reshape``, which copies only when they cannot be viewed; the 2-D operands then go to the
    kernel with their strides, so transposed or sliced 2-D inputs are not copied.

    The output is allocated in its final shape and written through a 2-D view, so the op does
    not return a view: autograd refuses in-place ops on a view made inside a custom op, and
    eager lets users modify a Linear's output in place.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    r2 = None if residual is None else residual.reshape(-1, residual.shape[-1])
    s2 = None if shortcut is None else shortcut.reshape(-1, shortcut.shape[-1])
    m, n = x2.shape[0], weight.shape[0]
    width = n if shortcut is None else n + shortcut.shape[-1]
    inner_act, outer_act = Activation(inner, inner_slope), Activation(outer, outer_slope)
    out = x.new_empty(*lead, width, dtype=out_dtype(x, gamma, residual, shortcut))
    if _kernel_path(x):
        from .kernels.linear_epilogue import linear_epilogue_forward

        _, z = linear_epilogue_forward(
            x2, weight, bias, r2, gamma, s2, gamma_scalar, alpha,
            inner_act, outer_act, shortcut_first, save_z, out=out.view(m, width),
        )  # fmt: skip
        if z is not None:
            z = z.view(*lead, n)
    else:
        z = x.new_empty(*lead, n) if save_z else None
        _torch_forward(
            x2, weight, bias, r2, gamma, s2, gamma_scalar, alpha, inner_act, outer_act,
            shortcut_first, out.view(m, width), None if z is None else z.view(m, n),
        )  # fmt: skip
    return out, x.new_empty(0) if z is None else z


def _fake(x, weight, bias, residual, gamma, shortcut, gamma_scalar, alpha, inner, inner_slope,
          outer, outer_slope, shortcut_first, save_z):  # fmt: skip
    n = weight.shape[0]
    width = n if shortcut is None else n + shortcut.shape[-1]
    out = x.new_empty(*x.shape[:-1], width, dtype=out_dtype(x, gamma, residual, shortcut))
    z = x.new_empty(*x.shape[:-1], n) if save_z else x.new_empty(0)
    return out, z


def _traced(x: torch.Tensor) -> bool:
    """Whether ``x`` is a tracing stand-in (fake or functional tensor) rather than real data."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(x, FunctionalTensor) or is_fake(x)


@functools.cache
def _launches_capturable() -> bool:
    """Whether tracing the Triton wrappers records their kernels.

    Read from the wrappers' source as ``triton_op`` reads it: each launch written
    ``wrap_triton(kernel)[grid](...)``, with ``wrap_triton`` imported from ``torch.library``.
    """
    if _interpreting():
        return False
    from torch._library.triton import get_inner_triton_kernels

    from .kernels.linear_epilogue import linear_epilogue_forward
    from .kernels.linear_epilogue_backward import linear_epilogue_backward

    return all(
        get_inner_triton_kernels(f) for f in (linear_epilogue_forward, linear_epilogue_backward)
    )


def _kernel_path(x: torch.Tensor) -> bool:
    """Whether the op runs the Triton kernels for ``x`` here (see the module docstring)."""
    return uses_triton(x) and (not _traced(x) or _launches_capturable())


def _linear_epilogue(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor | None,
    shortcut: torch.Tensor | None,
    gamma_scalar: float,
    alpha: float,
    inner: str,
    inner_slope: float,
    outer: str,
    outer_slope: float,
    shortcut_first: bool,
    save_z: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``outer(gamma * inner(x @ W.T + b) + alpha * r)``; inputs are already validated."""
    return _forward(x, weight, bias, residual, gamma, shortcut, gamma_scalar, alpha, inner,
                    inner_slope, outer, outer_slope, shortcut_first, save_z)  # fmt: skip


# A triton_op is decomposed under torch.compile, so Inductor sees what runs; without Triton a
# custom_op behaves the same everywhere else.
_define = torch.library.triton_op if triton_available() else torch.library.custom_op
linear_epilogue = _define("tritskip::linear_epilogue", mutates_args=())(_linear_epilogue)
linear_epilogue.register_fake(_fake)


def _vmap(info, in_dims, x, weight, bias, residual, gamma, shortcut, *settings):
    """Batching rule: a batch over the activations becomes one more leading dim of ``x``.

    Batched parameters (an ensemble of weights) run one op call per batch entry.
    """
    save_z = settings[-1]
    tensors = (x, weight, bias, residual, gamma, shortcut)
    dims = in_dims[:6]
    if dims[1] is None and dims[2] is None and dims[4] is None:

        def leading(t, d):
            if t is None:
                return None
            return t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)

        x, residual, shortcut = (
            leading(x, dims[0]),
            leading(residual, dims[3]),
            leading(shortcut, dims[5]),
        )
        result = linear_epilogue(x, weight, bias, residual, gamma, shortcut, *settings)
        return result, (0, 0 if save_z else None)
    results = [
        linear_epilogue(
            *(
                t if d is None or t is None else t.select(d, i)
                for t, d in zip(tensors, dims, strict=True)
            ),
            *settings,
        )
        for i in range(info.batch_size)
    ]
    out = torch.stack([r[0] for r in results])
    z = torch.stack([r[1] for r in results]) if save_z else results[0][1]
    return (out, z), (0, 0 if save_z else None)


linear_epilogue.register_vmap(_vmap)


def backward_from_output(inner: Activation, outer: Activation, has_residual: bool,
                         gamma_is_one: bool) -> bool:  # fmt: skip
    """Whether ``act'`` can be read off the op's output, so ``z`` need not be saved.

    True when only one activation is non-identity and eager's own backward of it reads its
    output (relu, tanh, sigmoid): ``inner`` is identity, or there is no merge at all (no
    residual, gamma 1). Saving the output then forbids no in-place change to the result that
    eager allows. leaky_relu's derivative is a function of its output too, but eager saves its
    input, so users may change its result in place: ``z`` is saved for it.
    """
    if inner.is_identity:
        return _eager_saves_output(outer)
    if outer.is_identity and not has_residual and gamma_is_one:
        return _eager_saves_output(inner)
    return False


def _eager_saves_output(act: Activation) -> bool:
    return act.name in ("identity", "relu", "tanh", "sigmoid") and output_determines_grad(
        act.name, act.negative_slope
    )


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, gamma, shortcut, gamma_scalar, alpha, inner, inner_slope,
     outer, outer_slope, shortcut_first, save_z) = inputs  # fmt: skip
    out, z = output
    ctx.mark_non_differentiable(z)
    ctx.inner = Activation(inner, inner_slope)
    ctx.outer = Activation(outer, outer_slope)
    ctx.gamma_scalar, ctx.alpha, ctx.shortcut_first = gamma_scalar, alpha, shortcut_first
    ctx.n = weight.shape[0]
    ctx.shortcut_width = 0 if shortcut is None else shortcut.shape[-1]
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.has_gamma = gamma is not None
    ctx.save_z = save_z
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
    # Either the output (act' read from it) or z plus the residual (to rebuild the merge).
    # Without activations neither is read, and not saving the output keeps in-place ops on it
    # legal, as they are after eager's Linear and add.
    if save_z:
        ctx.save_for_backward(x, weight, gamma, residual, None, z)
    elif ctx.inner.is_identity and ctx.outer.is_identity:
        ctx.save_for_backward(x, weight, gamma, None, None, None)
    else:
        ctx.save_for_backward(x, weight, gamma, None, out, None)


def _triton_backward(ctx, grad_out, x, weight, gamma, residual, out, z, y_cols):
    """dx, dW, db, dr, dgamma from the Triton kernels, which rebuild g_z as they load it."""
    from torch._library.triton import set_wrap_triton_enabled

    from .kernels.linear_epilogue_backward import linear_epilogue_backward

    needs = ctx.needs_input_grad
    from_output = z is None
    # Without activations no derivative is read from ``saved``; the gradient stands in.
    saved = z if z is not None else out if out is not None else grad_out
    # A launch wrapped for capture would take its tracing dispatch even when nothing traces;
    # launch directly then, as triton_op does for the forward.
    with contextlib.nullcontext() if _traced(x) else set_wrap_triton_enabled(False):
        dx, dw, db, dr, dgamma = linear_epilogue_backward(
            grad_out.reshape(-1, grad_out.shape[-1]),
            saved.reshape(-1, saved.shape[-1]),
            from_output,
            x.reshape(-1, x.shape[-1]),
            weight,
            None if residual is None else residual.reshape(-1, residual.shape[-1]),
            gamma, ctx.gamma_scalar, ctx.alpha, ctx.inner, ctx.outer, y_cols.start,
            (needs[0], needs[1], needs[2], needs[3], needs[4]),
            residual_dtype=ctx.residual_dtype,
        )  # fmt: skip
    if dx is not None:
        dx = dx.reshape(x.shape)
    if dr is not None:
        dr = dr.reshape(*x.shape[:-1], weight.shape[0])
    return dx, dw, db, dr, dgamma


def _widened(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def _backward(ctx, grad_out, _grad_z):
    x, weight, gamma, residual, out, z = ctx.saved_tensors
    n, s = ctx.n, ctx.shortcut_width
    y_cols = slice(s, s + n) if (s and ctx.shortcut_first) else slice(0, n)
    s_cols = slice(0, s) if ctx.shortcut_first else slice(n, n + s)
    dy = grad_out[..., y_cols]
    gamma_eff = gamma if gamma is not None else ctx.gamma_scalar

    needs = ctx.needs_input_grad
    ds = grad_out[..., s_cols].to(ctx.shortcut_dtype) if needs[5] else None
    if _kernel_path(x) and x.shape[-1] > 0 and n > 0:
        return (*_triton_backward(ctx, grad_out, x, weight, gamma, residual, out, z, y_cols), ds,
                None, None, None, None, None, None, None, None)  # fmt: skip

    # Derivatives of 16-bit values are taken in fp32 and rounded once, as eager's activation
    # backward kernels do; chains of 16-bit elementwise ops would round at every step.
    dy, z, out, residual = (_widened(t) for t in (dy, z, out, residual))
    if gamma is not None:
        gamma_eff = _widened(gamma)
    u = None
    if z is not None:
        u = apply_activation(z, ctx.inner.name, ctx.inner.negative_slope)
        if ctx.outer.is_identity:
            g_v = dy
        else:
            v = u * gamma_eff
            if residual is not None:
                v = v + ctx.alpha * residual
            g_v = activation_backward(dy, ctx.outer.name, ctx.outer.negative_slope, pre=v)
        g_z = activation_backward(g_v * gamma_eff, ctx.inner.name, ctx.inner.negative_slope, pre=z)
    else:
        y = None if out is None else out[..., y_cols]
        if ctx.inner.is_identity:
            g_v = activation_backward(dy, ctx.outer.name, ctx.outer.negative_slope, out=y)
            g_z = g_v * gamma_eff if (gamma is not None or ctx.gamma_scalar != 1.0) else g_v
        else:
            g_v = dy
            g_z = activation_backward(dy, ctx.inner.name, ctx.inner.negative_slope, out=y)

    # The merge may run in a wider dtype than the matmul (see out_dtype); the matmul grads
    # are taken in the matmul's dtype, each returned grad in its input's dtype.
    g_z_wide = g_z.reshape(-1, n)
    g_z2 = g_z_wide.to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    dx = (g_z2 @ weight).reshape(x.shape) if needs[0] else None
    dw = g_z2.t() @ x2 if needs[1] else None
    db = g_z_wide.sum(0).to(x.dtype) if needs[2] else None
    dr = (g_v * ctx.alpha).to(ctx.residual_dtype) if needs[3] else None
    dgamma = None
    if needs[4]:
        prod = g_v * u
        dgamma = prod.sum() if gamma.dim() == 0 else prod.reshape(-1, n).sum(0)
        dgamma = dgamma.to(gamma.dtype)
    return dx, dw, db, dr, dgamma, ds, None, None, None, None, None, None, None, None


linear_epilogue.register_autograd(_backward, setup_context=_setup_context)
