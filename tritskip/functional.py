"""Functional entry points: the fused op where it keeps eager semantics, eager otherwise.

``fused_linear`` computes ``activation(gamma * layer_activation(linear(x, W, b)) + alpha * r)``
and ``fused_linear_cat`` computes ``torch.cat([gamma * layer_activation(linear(x, W, b)), s],
-1)`` (or with the shortcut first). Both return exactly what the eager composition would, in
value (within rounding: the fused path accumulates in fp32 and rounds once), dtype, shape and
contiguity.

The fused op is used when the inputs allow it: floating tensors on one device, at least 2-D,
``x``, ``weight`` and ``bias`` of one dtype, a residual (or shortcut) of exactly the output's
shape. The residual, shortcut and ``gamma`` may be of another floating dtype: the output then
has the dtype eager's type promotion gives. Anything else (broadcasting residuals, 1-D inputs,
a matmul in mixed dtypes) runs the eager composition, which also produces eager's own errors
for inputs eager rejects.

Inside an autocast region the inputs of the matmul are cast the way autocast casts ``linear``
(floating tensors other than float64, to the region's dtype) and the epilogue then promotes as
eager does, so ``x + fc(x)`` with an fp32 ``x`` under bf16 autocast is fused and returns fp32,
with gradients in each input's own dtype. The fused result differs from eager only by rounding:
eager rounds the matmul to bf16 before the add, the fused op does not.

Under ``torch.func`` transforms that differentiate (``grad``, ``vjp``, ``jacrev``, ``jvp``)
and in forward-mode AD the eager composition runs, since those cannot use the op's autograd
formula; ``torch.vmap`` alone uses the op through its batching rule.

Everything here is plain tensor-metadata logic, so ``torch.compile(fullgraph=True)`` traces it
without graph breaks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .composite import composite_linear_cat, composite_linear_epilogue
from .epilogue import Activation
from .ops import backward_from_output, linear_epilogue, runs_composite

__all__ = ["eager_linear_cat", "eager_linear_epilogue", "fused_linear", "fused_linear_cat"]

ActivationLike = str | Activation | None


_IDENTITY = Activation()


def as_activation(act: ActivationLike) -> Activation:
    if act is None:
        return _IDENTITY
    if isinstance(act, Activation):
        return act
    # Memoized in a dict: torch.compile warns about tracing through a functools.cache wrapper.
    named = _NAMED.get(act)
    if named is None:
        named = _NAMED[act] = Activation(act)
    return named


_NAMED: dict[str, Activation] = {}


def _scaled(z: torch.Tensor, gamma: torch.Tensor | float | None) -> torch.Tensor:
    if gamma is None or (not isinstance(gamma, torch.Tensor) and gamma == 1.0):
        return z
    return z * gamma


def eager_linear_epilogue(x, weight, bias=None, *, residual=None, gamma=None, alpha=1.0,
                          activation=None, layer_activation=None):  # fmt: skip
    """The unfused composition, op by op as a user would write it."""
    u = as_activation(layer_activation)(F.linear(x, weight, bias))
    v = _scaled(u, gamma)
    if residual is not None:
        v = v + residual if alpha == 1.0 else torch.add(v, residual, alpha=alpha)
    return as_activation(activation)(v)


def eager_linear_cat(x, weight, bias=None, *, shortcut, gamma=None, layer_activation=None,
                     shortcut_first=False):  # fmt: skip
    y = _scaled(as_activation(layer_activation)(F.linear(x, weight, bias)), gamma)
    return torch.cat([shortcut, y] if shortcut_first else [y, shortcut], dim=-1)


_AUTODIFF_TRANSFORMS = (
    torch._C._functorch.TransformType.Grad,
    torch._C._functorch.TransformType.Jvp,
)


def _autodiff_without_formula() -> bool:
    """Whether a differentiation mode that cannot use the op's autograd formula is active.

    ``torch.func`` transforms that differentiate (grad, vjp, jacrev, jvp) do not see a formula
    registered on a custom op (pytorch/pytorch#168393, open in 2.13), and custom ops have no
    forward-mode formula for ``torch.autograd.forward_ad``. The eager composition runs there.
    """
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    stack = torch._C._functorch.get_interpreter_stack()
    return stack is not None and any(level.key() in _AUTODIFF_TRANSFORMS for level in stack)


def _fusable(x, weight, bias, gamma, extra, extra_shape) -> bool:
    """Whether the fused op reproduces eager for these inputs (see module docstring)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        return False
    if _autodiff_without_formula():
        return False
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.dtype != x.dtype:
        return False
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        return False
    tensors = [weight] if bias is None else [weight, bias]
    if isinstance(gamma, torch.Tensor):
        if gamma.shape not in ((), (weight.shape[0],)) or not gamma.is_floating_point():
            return False
        tensors.append(gamma)
    if extra is not None:
        if extra.shape != extra_shape or not extra.is_floating_point():
            return False
        tensors.append(extra)
    return all(t.device == x.device for t in tensors)


def _check_devices(where: str, x, weight, bias) -> None:
    """Raise where ``weight`` or ``bias`` is on another device than ``x``.

    Eager ``F.linear`` raises for most such mixes, but not for a CPU input with a ``meta``
    weight: it then returns uninitialized memory. The check makes every mix an error.
    """
    tensors = {"x": x, "weight": weight, "bias": bias}
    devices = {k: t.device for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    if "x" in devices and len(set(devices.values())) > 1:
        found = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise RuntimeError(f"{where}: expected x, weight and bias on one device, got {found}")


def _autocast_inputs(x, weight, bias):
    """``(x, weight, bias)`` as autocast would hand them to ``linear`` in the current region."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dtype)

    return cast(x), cast(weight), cast(bias)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def _gamma_args(gamma) -> tuple[torch.Tensor | None, float]:
    if isinstance(gamma, torch.Tensor):
        return gamma, 1.0
    return None, 1.0 if gamma is None else float(gamma)


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    gamma: torch.Tensor | float | None = None,
    alpha: float = 1.0,
    activation: ActivationLike = None,
    layer_activation: ActivationLike = None,
) -> torch.Tensor:
    """``activation(gamma * layer_activation(x @ W.T + b) + alpha * residual)`` in one kernel.

    ``gamma`` is a float, a 0-d tensor or a per-output-channel vector of shape ``[N]``;
    ``activation``/``layer_activation`` are names from :data:`tritskip.epilogue.ACTIVATIONS`
    or :class:`~tritskip.epilogue.Activation` objects.

    Memory saved for the backward, besides ``x`` and ``W``: nothing without activations; the
    output alone when the one activation is relu, leaky_relu (positive slope), tanh or sigmoid,
    whose derivative is a function of it; otherwise (gelu, silu, two activations, or a
    ``gamma`` that trains) the pre-activation ``z = x @ W.T + b``, one ``[M, N]`` tensor in the
    input dtype, which the forward kernel stores as it computes it. Recomputing ``z`` instead
    would save that tensor at the cost of a third matmul in the backward; eager's gelu keeps
    the same tensor, so storing it costs nothing over eager.
    """
    outer, inner = as_activation(activation), as_activation(layer_activation)
    _check_devices("fused_linear", x, weight, bias)
    if isinstance(x, torch.Tensor) and runs_composite(x):
        return composite_linear_epilogue(x, weight, bias, residual, gamma, alpha, inner, outer)
    out_shape = (*x.shape[:-1], weight.shape[0]) if x.dim() >= 1 else None
    xc, wc, bc = _autocast_inputs(x, weight, bias)
    if not _fusable(xc, wc, bc, gamma, residual, out_shape):
        return eager_linear_epilogue(x, weight, bias, residual=residual, gamma=gamma, alpha=alpha,
                                     activation=outer, layer_activation=inner)  # fmt: skip
    gamma_t, gamma_s = _gamma_args(gamma)
    gamma_grad = isinstance(gamma, torch.Tensor) and gamma.requires_grad
    save_z = _needs_grad(xc, wc, bc, residual, gamma) and (
        gamma_grad
        or not backward_from_output(
            inner, outer, residual is not None, gamma_t is None and gamma_s == 1.0
        )
    )
    out, _ = linear_epilogue(
        xc, wc, bc, residual, gamma_t, None, gamma_s, float(alpha),
        inner.name, inner.negative_slope, outer.name, outer.negative_slope, False, save_z,
    )  # fmt: skip
    return out


def fused_linear_cat(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    shortcut: torch.Tensor,
    gamma: torch.Tensor | float | None = None,
    layer_activation: ActivationLike = None,
    shortcut_first: bool = False,
) -> torch.Tensor:
    """``torch.cat([gamma * layer_activation(x @ W.T + b), shortcut], -1)`` in one kernel.

    The kernel writes the Linear's result into its column slice of the output and copies
    ``shortcut`` into the other, so the concatenation costs no extra pass. With
    ``shortcut_first`` the order is ``[shortcut, y]``.
    """
    inner = as_activation(layer_activation)
    _check_devices("fused_linear_cat", x, weight, bias)
    if isinstance(x, torch.Tensor) and runs_composite(x):
        return composite_linear_cat(x, weight, bias, shortcut, gamma, inner, shortcut_first)
    xc, wc, bc = _autocast_inputs(x, weight, bias)
    fusable = (
        isinstance(shortcut, torch.Tensor)
        and x.dim() >= 2
        and shortcut.dim() == x.dim()
        and _fusable(xc, wc, bc, gamma, shortcut, (*x.shape[:-1], shortcut.shape[-1]))
    )
    if not fusable:
        return eager_linear_cat(x, weight, bias, shortcut=shortcut, gamma=gamma,
                                layer_activation=inner, shortcut_first=shortcut_first)  # fmt: skip
    gamma_t, gamma_s = _gamma_args(gamma)
    gamma_grad = isinstance(gamma, torch.Tensor) and gamma.requires_grad
    # The output is the concatenation, which eager's activation never saved: reading act' off
    # it would forbid in-place changes to the result that eager allows, so z is saved instead.
    save_z = _needs_grad(xc, wc, bc, gamma) and (gamma_grad or not inner.is_identity)
    out, _ = linear_epilogue(
        xc, wc, bc, None, gamma_t, shortcut, gamma_s, 1.0,
        inner.name, inner.negative_slope, "identity", 0.01, shortcut_first, save_z,
    )  # fmt: skip
    return out
