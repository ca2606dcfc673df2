"""Dense chains in one buffer: ``h = cat([act(fc_i(h)), h], -1)`` for ``i = 1..L`` without copies.

Written out eagerly, every step of a DenseNet-style chain copies the whole growing tensor into a
new one, so a chain of ``L`` layers moves ``O(L²)`` bytes and keeps ``O(L²)`` activations alive
for the backward (each layer saves its input, the previous concatenation). Here the final
concatenation is allocated once. Its layout is eager's, newest first::

    columns: [ f_L | f_{L-1} | ... | f_1 | h0 ]

so the input of layer ``i``, ``h_{i-1} = [f_{i-1}, ..., f_1, h0]``, is the contiguous column
range that starts where ``f_i`` ends. Each layer reads that range as a strided view and writes
``act(h_{i-1} @ W_i.T + b_i)`` straight into its own columns (one ``addmm`` plus an in-place
activation on the PyTorch path, one kernel launch on the Triton path).

The backward (:class:`DenseChainFunction`) keeps the same shape of work: one gradient buffer
for the whole concatenation, walked from the last layer to the first. Layer ``i`` reads the
gradient of its columns, multiplies by ``act'``, and adds ``g @ W_i`` into the gradient of its
input columns in place. It saves only the output buffer (plus the pre-activations when ``act'``
cannot be read from the output, as for gelu and silu), so memory grows linearly in ``L``.

Aliasing: each call allocates a fresh buffer, so outputs of earlier calls are never touched.
The output itself is saved for the backward; modifying it in place before ``backward()`` makes
autograd raise, where the eager chain (which saves only the intermediate concatenations) would
not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module_hooks

from .epilogue import Activation, activation_backward, apply_activation, output_determines_grad
from .ops import uses_triton

__all__ = ["DenseChain", "DenseChainFunction", "dense_chain", "eager_dense_chain"]

ActivationLike = str | Activation | nn.Module | None

_IDENTITY = Activation()


def _as_activation(act: ActivationLike) -> Activation:
    """An :class:`Activation` from a name, an ``Activation``, ``None`` or a ``torch.nn`` module."""
    if act is None:
        return _IDENTITY
    if isinstance(act, Activation):
        return act
    if isinstance(act, str):
        return Activation(act)
    kind = type(act)
    simple = {
        nn.Identity: "identity",
        nn.ReLU: "relu",
        nn.SiLU: "silu",
        nn.Tanh: "tanh",
        nn.Sigmoid: "sigmoid",
    }
    if kind in simple:
        return Activation(simple[kind])
    if kind is nn.LeakyReLU:
        return Activation("leaky_relu", float(act.negative_slope))
    if kind is nn.GELU:
        return Activation("gelu_tanh" if act.approximate == "tanh" else "gelu")
    raise TypeError(
        f"activation must be a name, an Activation or one of nn.ReLU, nn.LeakyReLU, nn.GELU, "
        f"nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity; got {kind.__name__}"
    )


def eager_dense_chain(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    activation: ActivationLike = "relu",
) -> torch.Tensor:
    """The chain as written by hand: ``h = torch.cat([act(F.linear(h, W, b)), h], -1)``."""
    act = _as_activation(activation)
    biases = [None] * len(weights) if biases is None else biases
    h = x
    for weight, bias in zip(weights, biases, strict=True):
        h = torch.cat([act(F.linear(h, weight, bias)), h], dim=-1)
    return h


def _check_devices(x, weights, biases) -> None:
    """Raise where a weight or bias is on another device than ``x``: eager ``F.linear`` would
    return uninitialized memory for a CPU input with a ``meta`` weight instead of raising."""
    if not isinstance(x, torch.Tensor):
        return
    for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        for name, t in (("weight", weight), ("bias", bias)):
            if isinstance(t, torch.Tensor) and t.device != x.device:
                raise RuntimeError(
                    f"dense_chain: layer {i} {name} is on {t.device}, the input on {x.device}"
                )


def _fusable(x, weights, biases) -> bool:
    """Whether the one-buffer chain reproduces eager for these inputs; else eager runs."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        return False
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return False
    if x.is_nested or x.layout != torch.strided:
        return False
    width = x.shape[-1]
    for weight, bias in zip(weights, biases, strict=True):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != width:
            return False
        tensors = [weight]
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
                return False
            tensors.append(bias)
        if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
            return False
        width += weight.shape[0]
    return True


def _chain_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    act: Activation,
    save_z: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Allocate the ``[..., K0 + sum(N_i)]`` output and fill it; returns it and, with
    ``save_z``, each layer's 2-D pre-activation ``z_i = h_{i-1} @ W_i.T + b_i``."""
    k0 = x.shape[-1]
    total = k0 + sum(w.shape[0] for w in weights)
    out = x.new_empty(*x.shape[:-1], total)
    buf = out.view(-1, total)
    buf[:, total - k0 :].copy_(x.reshape(-1, k0))
    triton = uses_triton(x)
    if triton:
        from .kernels.linear_epilogue import linear_epilogue_forward
    zs = []
    start = total - k0  # first column of the current input h_{i-1}
    for weight, bias in zip(weights, biases, strict=True):
        n = weight.shape[0]
        col, inp = start - n, buf[:, start:]
        if triton:
            _, z = linear_epilogue_forward(
                inp, weight, bias, None, None, None, 1.0, 1.0,
                act, _IDENTITY, False, save_z, out=buf, out_col=col,
            )  # fmt: skip
        else:
            y = buf[:, col:start]
            if bias is None:
                torch.mm(inp, weight.t(), out=y)
            else:
                torch.addmm(bias, inp, weight.t(), out=y)
            z = y.clone() if save_z else None
            apply_activation(y, act.name, act.negative_slope, inplace=True)
        if save_z:
            zs.append(z)
        start = col
    return out, zs


def _activation_grad(
    dy: torch.Tensor, act: Activation, *, pre: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """``dy * act'``, from ``pre`` when given, else from the output ``out``.

    For 16-bit inputs the derivative is computed in fp32 and rounded once, as eager's fused
    activation backward kernels do; gelu' evaluated op by op in fp16 is several times less
    accurate. relu uses eager's own relu backward (one pass; multiplying by a boolean mask
    costs about ten times as much on CPU).
    """
    if act.is_identity:
        return dy
    if act.name == "relu":
        return torch.ops.aten.threshold_backward(dy, out, 0)
    dtype = dy.dtype
    wide = dtype in (torch.float16, torch.bfloat16)
    if wide:
        dy = dy.float()
    if pre is not None:
        g = activation_backward(dy, act.name, act.negative_slope, pre=pre.float() if wide else pre)
    else:
        g = activation_backward(dy, act.name, act.negative_slope, out=out.float() if wide else out)
    return g.to(dtype) if wide else g


class DenseChainFunction(torch.autograd.Function):
    """Autograd over a whole chain: saves one buffer, accumulates one gradient buffer.

    ``apply(x, activation, save_z, *weights, *biases)`` with ``L`` weights and ``L`` biases
    (``None`` for a layer without one); inputs are validated by :func:`dense_chain`.
    """

    @staticmethod
    def forward(ctx, x, act: Activation, save_z: bool, *params):
        num_layers = len(params) // 2
        weights, biases = params[:num_layers], params[num_layers:]
        out, zs = _chain_forward(x, weights, biases, act, save_z)
        ctx.act, ctx.num_layers, ctx.x_shape = act, num_layers, x.shape
        ctx.save_for_backward(out, *weights, *zs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        out, *rest = ctx.saved_tensors
        num_layers, act, x_shape = ctx.num_layers, ctx.act, ctx.x_shape
        weights, zs = rest[:num_layers], rest[num_layers:]
        needs = ctx.needs_input_grad
        total, k0 = out.shape[-1], x_shape[-1]
        buf = out.view(-1, total)
        # One gradient buffer for the whole concatenation; grad_out itself is left untouched
        # (other consumers may share it, and it may be an expanded view).
        grad_buf = torch.empty_like(buf)
        grad_buf.copy_(grad_out.reshape(buf.shape))
        # Columns from `end` on hold h0; their gradient is accumulated only when x needs it.
        end = total if needs[0] else total - k0
        dws: list[torch.Tensor | None] = [None] * num_layers
        dbs: list[torch.Tensor | None] = [None] * num_layers
        col = 0  # newest layer first: layer idx owns columns col:start, reads start:
        for idx in reversed(range(num_layers)):
            weight = weights[idx]
            start = col + weight.shape[0]
            g = _activation_grad(
                grad_buf[:, col:start], act, pre=zs[idx] if zs else None, out=buf[:, col:start]
            )
            if needs[3 + idx]:
                dws[idx] = g.t() @ buf[:, start:]
            if needs[3 + num_layers + idx]:
                dbs[idx] = g.sum(0)
            if end > start:
                grad_buf[:, start:end].addmm_(g, weight[:, : end - start])
            col = start
        dx = grad_buf[:, total - k0 :].reshape(x_shape).contiguous() if needs[0] else None
        return dx, None, None, *dws, *dbs


def dense_chain(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    activation: ActivationLike = "relu",
) -> torch.Tensor:
    """``h = torch.cat([activation(F.linear(h, W_i, b_i)), h], -1)`` for each layer, in one buffer.

    Layer ``i`` takes ``x.shape[-1] + sum(N_j for j < i)`` inputs. The result equals the eager
    chain's in value (within rounding), dtype, shape, contiguity and gradients: columns are
    ``[f_L, ..., f_1, x]``. Inputs the one-buffer form cannot take (mixed dtypes or devices,
    autocast, integer tensors, mismatched widths) run the eager chain, which also raises eager's
    errors.
    """
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(biases)} biases")
    _check_devices(x, weights, biases)
    if not weights or not _fusable(x, weights, biases):
        return eager_dense_chain(x, weights, biases, activation)
    act = _as_activation(activation)
    params = [*weights, *biases]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        save_z = not output_determines_grad(act.name, act.negative_slope)
        return DenseChainFunction.apply(x, act, save_z, *params)
    out, _ = _chain_forward(x, weights, biases, act, False)
    return out


# Symbolic tracing records the chain as one call instead of tracing into its checks.
torch.fx.wrap("dense_chain")


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


class DenseChain(nn.Module):
    """A DenseNet-style chain of Linear layers, each fed every earlier feature.

    ``forward(x)`` returns what ``h = torch.cat([activation(layer(h)), h], -1)`` repeated over
    the layers returns, newest features first: ``[f_L, ..., f_1, x]``, of width
    ``in_features + sum(growth)``. It allocates that result once and writes each layer's output
    into its columns; see :mod:`tritskip.dense_chain`.

    Build it from widths (layer ``i`` maps ``in_features + i * growth`` features to ``growth``),
    or from existing layers with :meth:`from_layers`::

        >>> chain = DenseChain(64, 32, num_layers=16, activation="relu")   # 64 -> 576 features
        >>> chain = DenseChain.from_layers([fc1, fc2, fc3], activation=nn.GELU())

    The layers live in ``self.layers`` (``state_dict`` keys ``layers.0.weight``, ...). The
    chain computes their Linear maps itself; if a layer carries a forward hook, the layers are
    called one by one as modules instead, so the hook runs.
    """

    def __init__(
        self,
        in_features: int,
        growth: int,
        num_layers: int,
        activation: ActivationLike = "relu",
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("growth", growth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DenseChain: {name} must be a positive int, got {value!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"DenseChain: num_layers must be a positive int, got {num_layers!r}")
        layers = [
            nn.Linear(in_features + i * growth, growth, bias=bias, device=device, dtype=dtype)
            for i in range(num_layers)
        ]
        self._attach(layers, activation)

    @classmethod
    def from_layers(
        cls, layers: Iterable[nn.Linear], activation: ActivationLike = "relu"
    ) -> DenseChain:
        """A chain over existing ``nn.Linear`` layers (shared, not copied).

        Layer ``i`` must take the chain's input width plus the output widths of the layers
        before it; output widths may differ from layer to layer.
        """
        chain = cls.__new__(cls)
        nn.Module.__init__(chain)
        chain._attach(list(layers), activation)
        return chain

    def _attach(self, layers: list[nn.Linear], activation: ActivationLike) -> None:
        if not layers:
            raise ValueError("DenseChain needs at least one layer")
        width = None
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Linear) or type(layer).forward is not nn.Linear.forward:
                raise TypeError(
                    f"DenseChain: layer {i} must be an nn.Linear (without its own forward), "
                    f"got {type(layer).__name__}"
                )
            if width is not None and layer.in_features != width:
                raise ValueError(
                    f"DenseChain: layer {i} takes {layer.in_features} features but the chain "
                    f"has {width} at that point"
                )
            width = (layer.in_features if width is None else width) + layer.out_features
        self.layers = nn.ModuleList(layers)
        self.activation = _as_activation(activation)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return self.in_features + sum(layer.out_features for layer in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hooked = any(_hooked(layer) for layer in self.layers) or bool(
            _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
        )
        if hooked:
            h = x
            for layer in self.layers:
                h = torch.cat([self.activation(layer(h)), h], dim=-1)
            return h
        weights = [layer.weight for layer in self.layers]
        biases = [layer.bias for layer in self.layers]
        return dense_chain(x, weights, biases, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_layers={self.num_layers}, activation={self.activation}"
        )
