"""What happens after the matmul: one description shared by blocks, ops, kernels and the pass.

With ``z = x @ W.T + b`` the fused Linear computes::

    y = outer(gamma * inner(z) + alpha * r)

``inner`` is an activation applied to the Linear's own output (``relu(fc(x)) + x``), ``outer``
one applied after the merge (``relu(fc(x) + x)``); ``gamma`` is a scalar or a per-output-channel
vector (LayerScale, ``x - fc(x)``, ``torch.add(x, fc(x), alpha=a)``); ``r`` is an optional
residual of ``z``'s shape. In concat mode there is no residual and no outer activation: ``y`` is
written into its column slice of ``[y, shortcut]`` (or ``[shortcut, y]``).

The activation table lives here for the PyTorch side and in ``tritskip.kernels.activations``
for the Triton side; both are indexed by :data:`ACTIVATION_CODES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_CODES",
    "Activation",
    "activation_backward",
    "apply_activation",
    "output_determines_grad",
]

# Order matters: the index is the constexpr code the Triton kernels branch on.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


@dataclass(frozen=True)
class Activation:
    """An elementwise activation by name; ``negative_slope`` is used by ``leaky_relu`` only."""

    name: str = "identity"
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        if self.name not in ACTIVATION_CODES:
            raise ValueError(
                f"unknown activation {self.name!r}; expected one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def code(self) -> int:
        return ACTIVATION_CODES[self.name]

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return apply_activation(u, self.name, self.negative_slope)

    def __str__(self) -> str:
        if self.name == "leaky_relu":
            return f"leaky_relu({self.negative_slope:g})"
        return self.name


def apply_activation(
    u: torch.Tensor, name: str, negative_slope: float = 0.01, *, inplace: bool = False
) -> torch.Tensor:
    """Apply activation ``name`` to ``u``; with ``inplace`` the result may overwrite ``u``."""
    if name == "identity":
        return u
    if name == "relu":
        return u.relu_() if inplace else u.relu()
    if name == "leaky_relu":
        return F.leaky_relu(u, negative_slope, inplace=inplace)
    if name == "gelu":
        return torch.ops.aten.gelu_(u) if inplace else F.gelu(u)
    if name == "gelu_tanh":
        return (
            torch.ops.aten.gelu_(u, approximate="tanh")
            if inplace
            else F.gelu(u, approximate="tanh")
        )
    if name == "silu":
        return F.silu(u, inplace=inplace)
    if name == "tanh":
        return u.tanh_() if inplace else u.tanh()
    if name == "sigmoid":
        return u.sigmoid_() if inplace else u.sigmoid()
    raise ValueError(f"unknown activation {name!r}")


def output_determines_grad(name: str, negative_slope: float = 0.01) -> bool:
    """True when act'(u) can be computed from act(u) alone, so the backward needs only the output.

    relu and leaky_relu (positive slope) keep the sign; tanh' = 1 - y², sigmoid' = y(1 - y).
    gelu and silu are not invertible from their output and need the pre-activation.
    """
    if name in ("identity", "relu", "tanh", "sigmoid"):
        return True
    return name == "leaky_relu" and negative_slope > 0


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _relu_backward(grad: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """Eager's ``threshold_backward``: zero where ``saved <= 0``, ``grad`` elsewhere.

    A product with a mask would differ on non-finite values: it passes nothing where ``saved``
    is NaN (eager passes ``grad``) and gives NaN where ``grad`` is NaN or Inf and ``saved <= 0``
    (eager gives 0). ``saved`` may be the input or the output of relu; both are ``<= 0`` at
    the same places.
    """
    return grad.masked_fill(saved <= 0, 0)


def activation_backward(
    grad: torch.Tensor,
    name: str,
    negative_slope: float = 0.01,
    *,
    pre: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad * act'(u)``, from the pre-activation ``pre`` or, where enough, the output ``out``."""
    if name == "identity":
        return grad
    if out is not None and output_determines_grad(name, negative_slope):
        if name == "relu":
            return _relu_backward(grad, out)
        if name == "leaky_relu":
            return torch.where(out > 0, grad, grad * negative_slope)
        if name == "tanh":
            return grad * (1 - out * out)
        if name == "sigmoid":
            return grad * (out * (1 - out))
    if pre is None:
        raise ValueError(f"the backward of {name} needs the pre-activation")
    u = pre
    if name == "relu":
        return _relu_backward(grad, u)
    if name == "leaky_relu":
        return torch.where(u > 0, grad, grad * negative_slope)
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(u * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
        return grad * (cdf + u * pdf)
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (u + 0.044715 * u * u * u)
        t = torch.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * u * u)
        return grad * (0.5 * (1 + t) + 0.5 * u * (1 - t * t) * d_inner)
    if name == "silu":
        s = torch.sigmoid(u)
        return grad * (s * (1 + u * (1 - s)))
    if name == "tanh":
        t = torch.tanh(u)
        return grad * (1 - t * t)
    if name == "sigmoid":
        s = torch.sigmoid(u)
        return grad * (s * (1 - s))
    raise ValueError(f"unknown activation {name!r}")
