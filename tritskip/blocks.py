"""Skip-connection blocks: the merge of a layer's output with its input, as modules.

``SkipConnection(layer, connection)`` computes ``connection(layer(x), x)``, after Flux.jl's block
of the same name. The common forms have their own names:

- :class:`Residual`: ``activation(layer(x) * scale + shortcut(x))``, with a projection shortcut
  chosen for you when the layer changes the width;
- :class:`ConcatSkip`: ``torch.cat([activation(layer(x)), x], -1)``, the DenseNet-style skip;
- :class:`Parallel`: ``connection(*(layer(x) for layer in layers))``, one input to many layers,
  or ``n`` inputs to ``n`` layers;
- :func:`residual_stack`: a sequence of layers with one skip over every ``span`` of them.

When the skipped layer is an ``nn.Linear``, or an ``nn.Sequential`` that ends in an
``nn.Linear`` (optionally followed by one activation module), the block runs the Sequential's
earlier modules as usual and computes the last Linear, the merge, the scale and the activations
in one call to :func:`~tritskip.functional.fused_linear` (or
:func:`~tritskip.functional.fused_linear_cat`). That call keeps eager semantics for any input;
the blocks take the plain path instead when fusing could skip something the user attached: a
forward hook on the layer, the Linear or an activation module, or a subclass that overrides
``forward``.

Activations may be given as a name from :data:`tritskip.epilogue.ACTIVATIONS`, an
:class:`~tritskip.epilogue.Activation`, one of the matching ``torch.nn`` modules (``nn.ReLU()``,
``nn.LeakyReLU(0.2)``, ``nn.GELU(approximate="tanh")``, ...) or functions (``F.relu``,
``torch.tanh``, ...), or any other callable, which then runs after the fused merge.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from .epilogue import ACTIVATIONS, Activation
from .functional import fused_linear, fused_linear_cat

__all__ = [
    "ConcatSkip",
    "Parallel",
    "Residual",
    "SkipConnection",
    "layer_scale",
    "residual_stack",
]

ActivationSpec = str | Activation | nn.Module | Callable[[torch.Tensor], torch.Tensor] | None
Connection = str | nn.Module | Callable[..., Any]

_CONNECTIONS = ("add", "cat")

# Activations the fused epilogue can apply itself. Modules are matched by exact type, so a
# subclass with its own forward is run as written.
_ACTIVATION_FUNCTIONS: dict[Callable[..., Any], Activation] = {
    F.relu: Activation("relu"),
    torch.relu: Activation("relu"),
    F.leaky_relu: Activation("leaky_relu"),
    F.gelu: Activation("gelu"),
    F.silu: Activation("silu"),
    F.tanh: Activation("tanh"),
    torch.tanh: Activation("tanh"),
    F.sigmoid: Activation("sigmoid"),
    torch.sigmoid: Activation("sigmoid"),
}

# Shape-preserving modules that may sit between a Linear and the end (or start) of a Sequential
# without hiding its width.
_ELEMENTWISE_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
)


# Symbolic tracing records the fused calls as single nodes instead of tracing into their input
# checks, so a model built from these blocks traces as a whole (and the graph pass counts these
# calls as already fused).
torch.fx.wrap("fused_linear")
torch.fx.wrap("fused_linear_cat")


def _arg(act: Activation) -> str | Activation | None:
    """``act`` as the fused functions take it: a plain name unless it carries a custom slope.

    Plain values keep the call recordable by any ``torch.fx`` tracer.
    """
    if act.is_identity:
        return None
    if act.name == "leaky_relu" and act.negative_slope != Activation().negative_slope:
        return act
    return act.name


# --- activations -------------------------------------------------------------------------------


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has hooks that only fire when the module itself is called."""
    return any(getattr(m, name, None) for name in _HOOK_DICTS)


def _global_hooks() -> bool:
    return any(getattr(_module_hooks, f"_global{name}", None) for name in _HOOK_DICTS)


def _module_activation(m: nn.Module) -> Activation | None:
    """The epilogue activation a ``torch.nn`` activation module computes, or ``None``."""
    kind = type(m)
    if kind is nn.Identity:
        return Activation()
    if kind is nn.ReLU:
        return Activation("relu")
    if kind is nn.LeakyReLU:
        return Activation("leaky_relu", float(m.negative_slope))
    if kind is nn.GELU:
        return Activation("gelu_tanh" if m.approximate == "tanh" else "gelu")
    if kind is nn.SiLU:
        return Activation("silu")
    if kind is nn.Tanh:
        return Activation("tanh")
    if kind is nn.Sigmoid:
        return Activation("sigmoid")
    return None


def _as_epilogue(act: Any) -> Activation | None:
    """The epilogue form of a stored activation; ``None`` when it must run as written."""
    if act is None:
        return Activation()
    if isinstance(act, Activation):
        return act
    if isinstance(act, nn.Module):
        return None if _hooked(act) else _module_activation(act)
    try:
        return _ACTIVATION_FUNCTIONS.get(act)
    except TypeError:  # unhashable callable
        return None


def _check_activation(act: ActivationSpec, what: str) -> Activation | nn.Module | Callable | None:
    """Validate a user's activation argument; names become :class:`Activation` objects."""
    if act is None or isinstance(act, (Activation, nn.Module)):
        return act
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(
                f"{what}: unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}, "
                "an Activation, an nn.Module or a callable"
            )
        return Activation(act)
    if not callable(act):
        raise TypeError(
            f"{what}: activation must be a name, an Activation, an nn.Module or a callable, "
            f"got {type(act).__name__}"
        )
    return act


def _activation_module(act: Activation | nn.Module) -> nn.Module:
    """A fresh ``torch.nn`` module computing ``act`` (a copy when ``act`` is a module)."""
    if isinstance(act, nn.Module):
        return copy.deepcopy(act)
    modules = {
        "identity": nn.Identity,
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    if act.name == "leaky_relu":
        return nn.LeakyReLU(act.negative_slope)
    if act.name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return modules[act.name]()


def _describe(fn: Any) -> str:
    if isinstance(fn, (str, Activation)):
        return str(fn)
    return getattr(fn, "__name__", None) or type(fn).__name__


# --- the Linear at the end of a layer ----------------------------------------------------------


class _LinearTail(NamedTuple):
    """A layer seen as ``inner(linear(prefix(x)))``: the part the fused epilogue can take over."""

    prefix: tuple[nn.Module, ...]
    linear: nn.Linear
    inner: Activation


def _plain_linear(m: Any) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and not _hooked(m)


def _linear_tail(layer: nn.Module, *, trailing_activation: bool = True) -> _LinearTail | None:
    """Split ``layer`` into eager modules, a last Linear and an optional activation after it.

    Returns ``None`` when the layer is not a plain ``nn.Linear`` or ``nn.Sequential`` ending in
    one (with ``trailing_activation``: or in a Linear and one known activation module), or when
    a forward hook would be skipped by fusing.
    """
    if _global_hooks():
        return None
    if _plain_linear(layer):
        return _LinearTail((), layer, Activation())
    if not isinstance(layer, nn.Sequential) or type(layer).forward is not nn.Sequential.forward:
        return None
    if _hooked(layer) or len(layer) == 0:
        return None
    modules = tuple(layer)
    inner = Activation()
    if trailing_activation and len(modules) >= 2 and not _plain_linear(modules[-1]):
        found = _as_epilogue(modules[-1])
        if found is None:
            return None
        inner, modules = found, modules[:-1]
    if not _plain_linear(modules[-1]):
        return None
    return _LinearTail(modules[:-1], modules[-1], inner)


def _run(modules: Iterable[nn.Module], x: Any) -> Any:
    for m in modules:
        x = m(x)
    return x


def _width_module(layer: nn.Module, from_end: bool) -> nn.Module | None:
    """The Linear (or LayerNorm) that fixes ``layer``'s input or output width, if one does."""
    if isinstance(layer, (nn.Linear, nn.LayerNorm)):
        return layer
    if type(layer) is not nn.Sequential:
        return None
    for m in reversed(layer) if from_end else layer:
        if isinstance(m, _ELEMENTWISE_MODULES):
            continue
        return _width_module(m, from_end)
    return None


def _width(layer: nn.Module, side: str) -> int | None:
    """``in_features``/``out_features`` of a Linear or a Sequential of Linears, else ``None``."""
    m = _width_module(layer, from_end=side == "out")
    if isinstance(m, nn.Linear):
        return m.out_features if side == "out" else m.in_features
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return m.normalized_shape[0]
    return None


def _check_layer(layer: Any, what: str) -> nn.Module:
    if not isinstance(layer, nn.Module):
        raise TypeError(
            f"{what}: layer must be an nn.Module, got {type(layer).__name__}; "
            "wrap plain functions in a module so their parameters (if any) are registered"
        )
    return layer


def _check_connection(connection: Any, what: str) -> Connection:
    if isinstance(connection, str):
        if connection not in _CONNECTIONS:
            raise ValueError(
                f"{what}: unknown connection {connection!r}; expected 'add', 'cat', "
                "an nn.Module or a callable"
            )
        return connection
    if not callable(connection):
        raise TypeError(
            f"{what}: connection must be 'add', 'cat', an nn.Module or a callable, "
            f"got {type(connection).__name__}"
        )
    return connection


def _merge_kind(connection: Connection) -> str | None:
    """``"add"``/``"sub"``/``"cat"`` for connections the fused epilogue computes, else ``None``."""
    if isinstance(connection, str):
        return connection
    if connection in (operator.add, torch.add):
        return "add"
    if connection in (operator.sub, torch.sub):
        return "sub"
    return None


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=-1)


def _add(*tensors: torch.Tensor) -> torch.Tensor:
    return functools.reduce(operator.add, tensors)


# --- blocks ------------------------------------------------------------------------------------


class SkipConnection(nn.Module):
    """``connection(layer(x), x)``: a layer with its input passed around it.

    Args:
        layer: the module skipped over.
        connection: how the layer's output ``y`` and the input ``x`` are merged. ``"add"`` for
            ``y + x``; ``"cat"`` for ``torch.cat([y, x], -1)``; an ``nn.Module`` such as
            ``nn.Bilinear(d_out, d_in, d)``, called as ``connection(y, x)`` and registered as
            the submodule ``connection`` so its parameters train; or any callable of two
            arguments (``torch.mul``, a lambda, ...).

    Example::

        >>> block = SkipConnection(nn.Linear(16, 16), "add")        # fc(x) + x
        >>> block = SkipConnection(nn.Linear(16, 8), nn.Bilinear(8, 16, 4))
    """

    def __init__(self, layer: nn.Module, connection: Connection) -> None:
        super().__init__()
        self.layer = _check_layer(layer, "SkipConnection")
        self.connection = _check_connection(connection, "SkipConnection")
        if connection == "add":
            d_in, d_out = _width(layer, "in"), _width(layer, "out")
            if d_in is not None and d_out is not None and d_in != d_out:
                raise ValueError(
                    f"SkipConnection: 'add' needs the layer to keep the width, but it maps "
                    f"{d_in} features to {d_out}; use Residual for a projection shortcut"
                )

    def forward(self, x: torch.Tensor) -> Any:
        merge = _merge_kind(self.connection)
        tail = None if merge is None else _linear_tail(self.layer)
        if tail is not None:
            h = _run(tail.prefix, x)
            lin, inner = tail.linear, tail.inner
            if merge == "cat":
                return fused_linear_cat(
                    h, lin.weight, lin.bias, shortcut=x, layer_activation=_arg(inner)
                )
            alpha = -1.0 if merge == "sub" else 1.0
            return fused_linear(
                h, lin.weight, lin.bias, residual=x, alpha=alpha, layer_activation=_arg(inner)
            )
        y = self.layer(x)
        if self.connection == "add":
            return y + x
        if self.connection == "cat":
            return torch.cat([y, x], dim=-1)
        return self.connection(y, x)

    def extra_repr(self) -> str:
        if isinstance(self.connection, nn.Module):
            return ""
        return f"connection={_describe(self.connection)}"


def layer_scale(num_features: int, init: float = 1e-5, *, device=None, dtype=None) -> nn.Parameter:
    """A learnable per-channel scale (LayerScale) for :class:`Residual`, filled with ``init``.

    ``Residual(mlp, scale=layer_scale(384, 1e-5))`` computes ``mlp(x) * gamma + x`` with
    ``gamma`` a trained vector of 384 values starting at ``1e-5``.
    """
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"layer_scale: num_features must be a positive int, got {num_features!r}")
    return nn.Parameter(torch.full((num_features,), float(init), device=device, dtype=dtype))


class Residual(nn.Module):
    """``activation(layer(x) * scale + shortcut(x))``: the residual block.

    Args:
        layer: the residual branch, e.g. ``nn.Linear(d, d)`` or
            ``nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))`` to skip over
            several layers.
        activation: applied after the merge (``relu(fc(x) + x)``); ``None`` for none.
        shortcut: the path ``x`` takes around the layer. ``None`` means identity, unless the
            layer's input and output widths are known (an ``nn.Linear``, or an ``nn.Sequential``
            of them) and differ: then it is a projection ``nn.Linear(d_in, d_out, bias=False)``,
            registered as ``shortcut``. Any module or callable is accepted.
        scale: multiplies the layer's output before the merge. ``None`` for none; a float for a
            fixed factor; an ``nn.Parameter`` (see :func:`layer_scale`) for a learned scalar or
            per-channel scale, registered as the parameter ``scale``; a plain tensor (0-d or one
            value per output channel) for a fixed one, registered as a buffer.

    Example::

        >>> Residual(nn.Linear(128, 128), activation="relu")           # relu(fc(x) + x)
        >>> Residual(nn.Linear(64, 32))                                # fc(x) + proj(x)
        >>> Residual(mlp, scale=layer_scale(384, 1e-5))                # LayerScale
    """

    def __init__(
        self,
        layer: nn.Module,
        activation: ActivationSpec = None,
        shortcut: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
        scale: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.layer = _check_layer(layer, "Residual")
        d_in, d_out = _width(layer, "in"), _width(layer, "out")
        if shortcut is None:
            shortcut = nn.Identity()
            if d_in is not None and d_out is not None and d_in != d_out:
                ref = next(layer.parameters())
                shortcut = nn.Linear(d_in, d_out, bias=False, device=ref.device, dtype=ref.dtype)
        elif not callable(shortcut):
            raise TypeError(
                f"Residual: shortcut must be an nn.Module or a callable, got "
                f"{type(shortcut).__name__}"
            )
        elif type(shortcut) is nn.Identity and None not in (d_in, d_out) and d_in != d_out:
            raise ValueError(
                f"Residual: an identity shortcut cannot join a layer that maps {d_in} features "
                f"to {d_out}; leave shortcut=None for a projection"
            )
        self.shortcut = shortcut
        self.activation = _check_activation(activation, "Residual")
        self._set_scale(scale, d_out)

    def _set_scale(self, scale: Any, d_out: int | None) -> None:
        if isinstance(scale, torch.Tensor):
            if not scale.is_floating_point():
                raise TypeError(f"Residual: scale must be floating point, got {scale.dtype}")
            widths = (1,) if d_out is None else (1, d_out)
            if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] not in widths):
                expected = "0-d or 1-D" if d_out is None else f"0-d or of shape ({d_out},)"
                raise ValueError(
                    f"Residual: scale must be {expected}, got shape {tuple(scale.shape)}"
                )
            if isinstance(scale, nn.Parameter):
                self.scale = scale
            else:
                self.register_buffer("scale", scale)
        elif scale is None:
            self.scale = None
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
            self.scale = float(scale)
        else:
            raise TypeError(
                f"Residual: scale must be a float, a tensor or an nn.Parameter, got "
                f"{type(scale).__name__}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tail = _linear_tail(self.layer)
        outer = _as_epilogue(self.activation)
        if tail is not None:
            h = _run(tail.prefix, x)
            r = x if _is_identity(self.shortcut) else self.shortcut(x)
            lin, inner = tail.linear, tail.inner
            fused = outer if outer is not None else Activation()
            y = fused_linear(h, lin.weight, lin.bias, residual=r, gamma=self.scale,
                             activation=_arg(fused), layer_activation=_arg(inner))  # fmt: skip
            return y if outer is not None else self.activation(y)
        y = self.layer(x)
        if self.scale is not None:
            y = y * self.scale
        y = y + self.shortcut(x)
        return y if self.activation is None else self.activation(y)

    def extra_repr(self) -> str:
        parts = []
        if self.activation is not None and not isinstance(self.activation, nn.Module):
            parts.append(f"activation={_describe(self.activation)}")
        if isinstance(self.scale, torch.Tensor):
            kind = "learnable" if isinstance(self.scale, nn.Parameter) else "fixed"
            parts.append(f"scale=<{kind} {tuple(self.scale.shape)}>")
        elif self.scale is not None:
            parts.append(f"scale={self.scale:g}")
        return ", ".join(parts)


def _is_identity(m: Any) -> bool:
    return type(m) is nn.Identity and not _hooked(m)


class ConcatSkip(nn.Module):
    """``torch.cat([activation(layer(x)), x], -1)``: the DenseNet-style concatenating skip.

    Each block widens its input by the layer's output width, so later layers see every earlier
    feature. With ``shortcut_first`` the order is ``[x, activation(layer(x))]``. When the layer
    is a Linear the result is written straight into the concatenated buffer.

    Example::

        >>> ConcatSkip(nn.Linear(64, 32), activation="relu")           # 64 -> 96 features
    """

    def __init__(
        self, layer: nn.Module, activation: ActivationSpec = None, *, shortcut_first: bool = False
    ) -> None:
        super().__init__()
        self.layer = _check_layer(layer, "ConcatSkip")
        self.activation = _check_activation(activation, "ConcatSkip")
        self.shortcut_first = bool(shortcut_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _as_epilogue(self.activation)
        tail = None
        if act is not None:
            tail = _linear_tail(self.layer, trailing_activation=act.is_identity)
        if tail is not None:
            h = _run(tail.prefix, x)
            inner = tail.inner if act.is_identity else act
            lin = tail.linear
            return fused_linear_cat(h, lin.weight, lin.bias, shortcut=x,
                                    layer_activation=_arg(inner),
                                    shortcut_first=self.shortcut_first)  # fmt: skip
        y = self.layer(x)
        if self.activation is not None:
            y = self.activation(y)
        return torch.cat([x, y] if self.shortcut_first else [y, x], dim=-1)

    def extra_repr(self) -> str:
        parts = []
        if self.activation is not None and not isinstance(self.activation, nn.Module):
            parts.append(f"activation={_describe(self.activation)}")
        if self.shortcut_first:
            parts.append("shortcut_first=True")
        return ", ".join(parts)


class Parallel(nn.Module):
    """``connection(layer_1(x), ..., layer_n(x))``: branches merged by ``connection``.

    Called with one input, every layer gets it; called with ``n`` inputs (or one tuple or list
    of ``n``), input ``i`` goes to layer ``i``. ``connection`` is ``"add"`` (the sum of the
    outputs), ``"cat"`` (``torch.cat(outputs, -1)``), an ``nn.Module`` registered as
    ``connection`` (``nn.Bilinear`` for two branches), or any callable taking ``n`` arguments.
    The layers are registered as ``layers.0``, ``layers.1``, ...

    Example::

        >>> Parallel("cat", nn.Linear(8, 4), nn.Linear(8, 2))          # 8 -> 6 features
        >>> Parallel("add", nn.Linear(3, 5), nn.Linear(7, 5))(a, b)    # fc1(a) + fc2(b)
    """

    def __init__(self, connection: Connection, *layers: nn.Module) -> None:
        super().__init__()
        self.connection = _check_connection(connection, "Parallel")
        if not layers:
            raise ValueError("Parallel: needs at least one layer")
        for i, layer in enumerate(layers):
            _check_layer(layer, f"Parallel (layer {i})")
        self.layers = nn.ModuleList(layers)

    def forward(self, *xs: Any) -> Any:
        if len(xs) == 1 and isinstance(xs[0], (tuple, list)):
            xs = tuple(xs[0])
        n = len(self.layers)
        if len(xs) == 1:
            xs = xs * n
        elif len(xs) != n:
            raise ValueError(
                f"Parallel: got {len(xs)} inputs for {n} layers; pass one input (shared by "
                f"every layer) or exactly {n}"
            )
        merge = _merge_kind(self.connection)
        tail = None if merge not in ("add", "cat") or n < 2 else _linear_tail(self.layers[-1])
        if tail is None:
            outputs = [layer(x) for layer, x in zip(self.layers, xs, strict=True)]
            if self.connection == "add":
                return _add(*outputs)
            if self.connection == "cat":
                return _cat(*outputs)
            return self.connection(*outputs)
        # The last branch is a Linear: merge the others in its epilogue.
        others = [layer(x) for layer, x in zip(self.layers[:-1], xs[:-1], strict=True)]
        h = _run(tail.prefix, xs[-1])
        lin, inner = tail.linear, tail.inner
        if merge == "add":
            return fused_linear(h, lin.weight, lin.bias, residual=_add(*others),
                                layer_activation=_arg(inner))  # fmt: skip
        return fused_linear_cat(h, lin.weight, lin.bias, shortcut=_cat(*others),
                                layer_activation=_arg(inner), shortcut_first=True)  # fmt: skip

    def extra_repr(self) -> str:
        if isinstance(self.connection, nn.Module):
            return ""
        return f"connection={_describe(self.connection)}"


def residual_stack(
    layers: Iterable[nn.Module], span: int = 2, activation: ActivationSpec = None
) -> nn.Sequential:
    """Group ``layers`` into :class:`Residual` blocks, each skipping over ``span`` of them.

    Within a group ``activation`` goes between consecutive layers, and it is applied again after
    each merge, so ``span=2`` with ``"relu"`` builds the classic block
    ``relu(x + l2(relu(l1(x))))``. ``activation`` is a name, an :class:`Activation`, a torch
    activation function (``F.relu``) or an ``nn.Module`` (copied for each place it is used).

    Example: two blocks ``relu(x + fc2(relu(fc1(x))))``, each a ``Residual`` around
    ``nn.Sequential(fc1, nn.ReLU(), fc2)``::

        >>> residual_stack([nn.Linear(64, 64) for _ in range(4)], span=2, activation="relu")
    """
    layers = list(layers)
    if not isinstance(span, int) or isinstance(span, bool) or span < 1:
        raise ValueError(f"residual_stack: span must be a positive int, got {span!r}")
    if not layers:
        raise ValueError("residual_stack: needs at least one layer")
    if len(layers) % span:
        raise ValueError(
            f"residual_stack: cannot split {len(layers)} layers into groups of span={span}"
        )
    for i, layer in enumerate(layers):
        _check_layer(layer, f"residual_stack (layer {i})")
    act = _check_activation(activation, "residual_stack")
    if act is not None and not isinstance(act, (Activation, nn.Module)):
        known = _as_epilogue(act)
        if known is None:
            raise TypeError(
                "residual_stack: activation goes between layers, so it must be a name, an "
                f"Activation, an nn.Module or a torch activation function, got {act!r}"
            )
        act = known
    blocks = []
    for start in range(0, len(layers), span):
        group: list[nn.Module] = []
        for layer in layers[start : start + span]:
            if group and act is not None:
                group.append(_activation_module(act))
            group.append(layer)
        body = group[0] if span == 1 else nn.Sequential(*group)
        outer = act if act is None or isinstance(act, Activation) else _activation_module(act)
        blocks.append(Residual(body, activation=outer))
    return nn.Sequential(*blocks)
