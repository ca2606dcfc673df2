"""The CPU path in eager mode: the epilogue as PyTorch ops, in place wherever autograd allows.

On CPU there is no kernel to fuse into, and a ``torch.library`` op costs more in dispatch (about
0.2 ms a call, measured on ``[64, 128]`` inputs) than the whole eager composition. So outside
``torch.compile``/``torch.export`` the functional entry points run this instead: ``F.linear``
(one ``addmm``), then each epilogue step in place on the fresh result, skipping the extra
allocation and pass eager spends on ``y + r`` and ``relu(...)``.

A step runs in place only when autograd can still differentiate it: no earlier step saved the
tensor it mutates (relu, leaky_relu, tanh and sigmoid save their *output*; gelu and silu their
input), gelu and silu are never in place under autograd, and the result dtype does not widen
(an fp16 matmul plus an fp32 residual allocates, as eager does). Without autograd every step is
in place, and a concatenation's Linear writes straight into its slice of the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .epilogue import Activation, apply_activation

__all__ = ["composite_linear_cat", "composite_linear_epilogue"]

# Activations whose eager autograd formula reads their output: mutating that output afterwards
# would break eager's backward too, and running them in place is safe. (leaky_relu's in-place
# form saves its output but the out-of-place one its input, so it is not among them: in place,
# it would forbid in-place changes to its result that eager allows.)
_SAVES_OUTPUT = ("relu", "tanh", "sigmoid")


def _saves_output(act: Activation) -> bool:
    return act.name in _SAVES_OUTPUT


def _activate(y: torch.Tensor, act: Activation, *, grad: bool, frozen: bool) -> tuple:
    """Apply ``act``; returns ``(y, frozen)`` where frozen means y must not be mutated now."""
    if act.is_identity:
        return y, frozen
    inplace = not grad or (not frozen and _saves_output(act))
    y = apply_activation(y, act.name, act.negative_slope, inplace=inplace)
    return y, grad and _saves_output(act)


def _fits(t: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``y op= t`` keeps y's shape, dtype and device (else the step must allocate, as
    eager does, and raise eager's error: an in-place op with a ``meta`` operand is a silent
    no-op on a CPU tensor)."""
    if not isinstance(t, torch.Tensor) or t.device != y.device:
        return False
    if t.shape == y.shape:
        return t.dtype == y.dtype
    if t.dim() > y.dim():
        return False
    if t.shape != y.shape[y.dim() - t.dim() :] and t.numel() != 1:
        return False
    return torch.result_type(y, t) == y.dtype


def _grad_mode(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # noqa: SIM110 - a loop, not a generator: this runs on every call
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def composite_linear_epilogue(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor | float | None,
    alpha: float,
    inner: Activation,
    outer: Activation,
) -> torch.Tensor:
    """``outer(gamma * inner(x @ W.T + b) + alpha * r)`` as eager does it, minus the copies.

    Takes any inputs eager takes (broadcasting, autocast, 1-D ``x``) and raises eager's errors:
    a step goes in place only when it cannot change the result's shape or dtype.
    """
    grad = _grad_mode(x, weight, bias, residual, gamma)
    y = F.linear(x, weight, bias)
    y, frozen = _activate(y, inner, grad=grad, frozen=False)
    if isinstance(gamma, torch.Tensor):
        widens = not _fits(gamma, y)
        # mul_ by a tensor that needs grad would save the y it overwrites.
        if frozen or widens or (grad and gamma.requires_grad):
            y, frozen = y * gamma, False
        else:
            y = y.mul_(gamma)
    elif gamma is not None and gamma != 1.0:
        y = y * gamma if frozen else y.mul_(gamma)
        frozen = False
    if residual is not None:
        if frozen or not _fits(residual, y):
            y = torch.add(y, residual, alpha=alpha) if alpha != 1.0 else y + residual
            frozen = False
        else:
            y = y.add_(residual, alpha=alpha)
    y, _ = _activate(y, outer, grad=grad, frozen=frozen)
    return y


def composite_linear_cat(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    shortcut: torch.Tensor,
    gamma: torch.Tensor | float | None,
    inner: Activation,
    shortcut_first: bool,
) -> torch.Tensor:
    """``cat([gamma * inner(x @ W.T + b), s], -1)``; without autograd, written in place."""
    grad = _grad_mode(x, weight, bias, shortcut, gamma)
    plain = (
        grad
        or not isinstance(shortcut, torch.Tensor)
        or x.dim() < 2
        or shortcut.shape[:-1] != x.shape[:-1]
        or weight.dim() != 2
        or torch.is_autocast_enabled(x.device.type)
        or any(t is not None and t.device != x.device for t in (weight, bias, shortcut))
        or any(t is not None and t.dtype != x.dtype for t in (weight, bias, shortcut))
        or (isinstance(gamma, torch.Tensor) and (gamma.dim() > 1 or gamma.dtype != x.dtype))
    )
    if plain:
        y = composite_linear_epilogue(x, weight, bias, None, gamma, 1.0, inner, Activation())
        return torch.cat([shortcut, y] if shortcut_first else [y, shortcut], dim=-1)
    n, s = weight.shape[0], shortcut.shape[-1]
    out = x.new_empty(*x.shape[:-1], n + s)
    out2 = out.view(-1, n + s)
    y2, s2 = (out2[:, s:], out2[:, :s]) if shortcut_first else (out2[:, :n], out2[:, n:])
    s2.copy_(shortcut.reshape(-1, s))
    x2 = x.reshape(-1, x.shape[-1])
    if bias is not None:
        torch.addmm(bias, x2, weight.t(), out=y2)
    else:
        torch.mm(x2, weight.t(), out=y2)
    apply_activation(y2, inner.name, inner.negative_slope, inplace=True)
    if gamma is not None and not (not isinstance(gamma, torch.Tensor) and gamma == 1.0):
        y2.mul_(gamma)
    return out
