"""The benchmark workloads: plain PyTorch modules, written the way users write them.

Each workload builds, for one width, three callables that share the same parameters:

- ``plain``: the module as a user writes it (eager PyTorch; also what ``torch.compile`` gets);
- ``addmm``: the same model hand-written with ``torch.addmm`` taking the residual as ``C`` and
  in-place activations, the best a user can do in eager PyTorch without a custom kernel;
- ``fused``: the tritskip version. For the op-level workloads it calls
  :func:`tritskip.fused_linear` / :func:`tritskip.fused_linear_cat` directly; for the models it
  is ``None`` and the runner uses ``tritskip.graph_pass.optimize(plain)``.

Alongside, :class:`LinearSpec` lists the Linear layers of a workload so that FLOPs and the
minimum bytes of the fused implementation can be counted without running anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import fused_linear, fused_linear_cat

__all__ = [
    "WORKLOADS",
    "DenseChain",
    "LinearSpec",
    "OpCat",
    "OpResidual",
    "PolicyMLP",
    "ResidualMLP",
    "TransformerMLP",
    "Workload",
]


# Plain models ------------------------------------------------------------------------------


class OpResidual(nn.Module):
    """``relu(x @ W.T + b + x)``: the fused op alone."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x) + x)


class OpCat(nn.Module):
    """``cat([relu(x @ W.T + b), x], -1)``: the concatenating op alone."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(self.fc(x)), x], dim=-1)


class PolicyMLP(nn.Module):
    """Flux's policy MLP, with its hidden width as a parameter (128 is the original).

    ``Dense(64 => w, relu)``, ``SkipConnection(Dense(w => w, relu), +)``,
    ``Dense(w => w/4, relu)``, ``SkipConnection(Dense(w/4 => w/4, relu), +)``,
    ``Dense(w/4 => 10)``.
    """

    def __init__(self, width: int = 128, in_features: int = 64, out_features: int = 10) -> None:
        super().__init__()
        narrow = width // 4
        self.fc1 = nn.Linear(in_features, width)
        self.skip1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, narrow)
        self.skip2 = nn.Linear(narrow, narrow)
        self.head = nn.Linear(narrow, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = h + F.relu(self.skip1(h))
        h = F.relu(self.fc2(h))
        h = h + F.relu(self.skip2(h))
        return self.head(h)


class ResidualMLP(nn.Module):
    """``depth`` blocks of ``x = relu(fc(x) + x)``."""

    def __init__(self, width: int, depth: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.layers:
            x = torch.relu(fc(x) + x)
        return x


class TransformerMLP(nn.Module):
    """A pre-norm transformer MLP block: ``x + fc2(gelu(fc1(ln(x))))``, hidden width 4x."""

    def __init__(self, width: int, expansion: int = 4) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class DenseChain(nn.Module):
    """DenseNet-style chain: ``depth`` layers of ``x = cat([relu(fc(x)), x], -1)``.

    Each layer adds ``growth`` features, so the last one reads ``width + (depth-1) * growth``.
    """

    def __init__(self, width: int, depth: int = 16, growth: int | None = None) -> None:
        super().__init__()
        growth = growth or max(8, width // 4)
        self.layers = nn.ModuleList(nn.Linear(width + i * growth, growth) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.layers:
            x = torch.cat([torch.relu(fc(x)), x], dim=-1)
        return x


# Hand-written addmm versions ----------------------------------------------------------------


def _relu_(y: torch.Tensor) -> torch.Tensor:
    return y.relu_()


def _gelu(y: torch.Tensor) -> torch.Tensor:
    # In place only where autograd is off: gelu's backward needs its input.
    return torch.ops.aten.gelu_(y) if not torch.is_grad_enabled() else F.gelu(y)


def addmm_linear(
    x: torch.Tensor,
    fc: nn.Linear,
    residual: torch.Tensor | None = None,
    act: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``act(x @ W.T + b + residual)`` as ``addmm`` with ``C = residual`` (else ``C = b``)."""
    if residual is None:
        y = torch.addmm(fc.bias, x, fc.weight.t())
    else:
        y = torch.addmm(residual, x, fc.weight.t())
        y.add_(fc.bias)
    return y if act is None else act(y)


class _Bound(nn.Module):
    """A forward function bound to another module's parameters (shared, not copied)."""

    def __init__(
        self, model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    ):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self.model, x)


def _addmm_op_residual(m: OpResidual, x):
    return addmm_linear(x, m.fc, x, _relu_)


def _addmm_op_cat(m: OpCat, x):
    return torch.cat([addmm_linear(x, m.fc, None, _relu_), x], dim=-1)


def _addmm_policy(m: PolicyMLP, x):
    h = addmm_linear(x, m.fc1, None, _relu_)
    h = h + addmm_linear(h, m.skip1, None, _relu_)
    h = addmm_linear(h, m.fc2, None, _relu_)
    h = h + addmm_linear(h, m.skip2, None, _relu_)
    return addmm_linear(h, m.head)


def _addmm_residual_mlp(m: ResidualMLP, x):
    for fc in m.layers:
        x = addmm_linear(x, fc, x, _relu_)
    return x


def _addmm_transformer(m: TransformerMLP, x):
    h = addmm_linear(m.ln(x), m.fc1, None, _gelu)
    return addmm_linear(h, m.fc2, x)


def _addmm_dense(m: DenseChain, x):
    for fc in m.layers:
        x = torch.cat([addmm_linear(x, fc, None, _relu_), x], dim=-1)
    return x


# Direct fused-op versions (op-level workloads only) ----------------------------------------


def _fused_op_residual(m: OpResidual, x):
    return fused_linear(x, m.fc.weight, m.fc.bias, residual=x, activation="relu")


def _fused_op_cat(m: OpCat, x):
    return fused_linear_cat(x, m.fc.weight, m.fc.bias, shortcut=x, layer_activation="relu")


# Cost model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSpec:
    """One fused Linear: ``K -> N``, plus what its epilogue reads and writes besides.

    ``residual``: the epilogue reads a residual that is not the Linear's own input (when it is
    the input, the bytes are already counted). ``shortcut``: width of a shortcut copied into a
    concatenation buffer (read from the input, written to the output). ``extra_elems``:
    elementwise work outside any Linear (a LayerNorm), as elements read plus written per row.
    """

    k: int
    n: int
    residual: bool = False
    shortcut: int = 0
    extra_elems: int = 0


def flops(specs: list[LinearSpec], rows: int, backward: bool) -> float:
    """Matmul FLOPs; the backward adds two matmuls of the same size per Linear."""
    fwd = sum(2.0 * rows * s.k * s.n for s in specs)
    return 3.0 * fwd if backward else fwd


def min_bytes(specs: list[LinearSpec], rows: int, itemsize: int, backward: bool) -> float:
    """Bytes a fused implementation must move, one kernel per Linear (a lower bound).

    Forward per Linear: read x [rows, K], W [N, K] and b, the residual when it is a separate
    tensor, write y [rows, N + shortcut]. Backward per Linear: read dy, the saved output (or
    pre-activation), x and W; write dx and dW; read the shortcut's slice of dy and add it to dx.
    """
    total = 0.0
    for s in specs:
        weights = s.n * s.k + s.n
        fwd = rows * s.k + weights + rows * (s.n + s.shortcut) + rows * s.extra_elems
        if s.residual:
            fwd += rows * s.n
        total += fwd
        if backward:
            total += 2 * rows * s.n + 2 * rows * s.k + 2 * weights + rows * s.shortcut
            total += rows * s.extra_elems + (rows * s.n if s.residual else 0)
    return total * itemsize


# Registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A named workload; ``build(width)`` returns the plain module (default dtype, CPU)."""

    name: str
    title: str
    kind: str  # "op" (a single fused op) or "model"
    build: Callable[[int], nn.Module]
    in_features: Callable[[int], int]
    specs: Callable[[int], list[LinearSpec]]
    addmm_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    fused_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    def addmm(self, model: nn.Module) -> nn.Module:
        return _Bound(model, self.addmm_forward)

    def fused(self, model: nn.Module) -> nn.Module | None:
        return None if self.fused_forward is None else _Bound(model, self.fused_forward)


def _policy_specs(w: int) -> list[LinearSpec]:
    q = w // 4
    return [LinearSpec(64, w), LinearSpec(w, w), LinearSpec(w, q), LinearSpec(q, q),
            LinearSpec(q, 10)]  # fmt: skip


def _dense_specs(w: int, depth: int = 16) -> list[LinearSpec]:
    g = max(8, w // 4)
    return [LinearSpec(w + i * g, g, shortcut=w + i * g) for i in range(depth)]


def _transformer_specs(w: int) -> list[LinearSpec]:
    return [LinearSpec(w, 4 * w, extra_elems=2 * w), LinearSpec(4 * w, w, residual=True)]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("op_add", "relu(x W^T + b + x)", "op", OpResidual, lambda w: w,
                 lambda w: [LinearSpec(w, w)], _addmm_op_residual, _fused_op_residual),
        Workload("op_cat", "cat([relu(x W^T + b), x])", "op", OpCat, lambda w: w,
                 lambda w: [LinearSpec(w, w, shortcut=w)], _addmm_op_cat, _fused_op_cat),
        Workload("policy_mlp", "policy MLP (Flux)", "model", PolicyMLP, lambda w: 64,
                 _policy_specs, _addmm_policy),
        Workload("residual_mlp8", "residual MLP, 8 blocks", "model", ResidualMLP, lambda w: w,
                 lambda w: [LinearSpec(w, w)] * 8, _addmm_residual_mlp),
        Workload("transformer_mlp", "x + fc2(gelu(fc1(ln(x))))", "model", TransformerMLP,
                 lambda w: w, _transformer_specs, _addmm_transformer),
        Workload("dense_chain16", "DenseNet-style chain, 16 cat layers", "model", DenseChain,
                 lambda w: w, _dense_specs, _addmm_dense),
    ]
}  # fmt: skip
