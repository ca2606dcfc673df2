"""Find skip connections in an existing model and route them through the fused Linear epilogue.

:func:`optimize` traces a model with ``torch.fx`` and rewrites every *site*: a Linear (an
``nn.Linear`` module call, ``F.linear``, a module that stores its weight as ``[in, out]`` and
calls ``addmm`` (GPT-2's ``Conv1D``), or, where shapes are recorded, ``torch.addmm(b, x, W)``
with the flatten/unflatten views around it) whose output flows through

- an optional activation (``layer_activation``; a module, a function, a method, or the same
  function written out as elementwise arithmetic on one tensor, like GPT-2's ``gelu_new``,
  recognized by evaluating it in float64 on points over [-10, 10]),
- an optional multiplication by a number, or by a tensor attribute of shape ``[]`` or ``[N]``
  (``gamma``),
- an optional dropout right before the merge (see *Dropout* below),
- an optional add or subtraction with another tensor (``residual``; ``+``, ``torch.add`` with
  ``alpha``, ``.add``, ``+=``, either operand order, ``a - b``), or a two-part ``torch.cat``
  along the last dimension (``shortcut``),
- and, unless it ended in a ``cat``, an optional activation (``activation``),

into one call of :func:`~tritskip.functional.fused_linear` or
:func:`~tritskip.functional.fused_linear_cat`. A chain needs at least one step after the Linear.
Two or more DenseNet-style steps in a row (``h = torch.cat([act(fc(h)), h], -1)``, each
concatenation feeding only the next step) become one :func:`~tritskip.dense_chain.dense_chain`
call that fills a single buffer instead (rules in :mod:`tritskip.dense_chain_pass`).
:func:`explain` reports the same sites without changing anything.

What the rewrite assumes and keeps:

- **Ownership.** Every intermediate value it absorbs (the Linear's output, the activation's, the
  scaled value, the sum) must have exactly one user; otherwise the chain stops before it.
  Values the model keeps elsewhere are never folded away.
- **In-place ops.** Ops that mutate a tensor are recognized by name (``relu_``, ``add_``), by
  ``inplace=True`` (functions and modules), by the augmented operators (``+=``, which this
  tracer records as ``operator.iadd`` so the mutation survives tracing) and ``x[i] = v``. An
  in-place op inside a chain is absorbed only when it mutates the chain's own fresh value
  (``h = fc(x); h += x``); ``x += fc(x)`` updates ``x`` in place and is left as written. The
  fused call runs where the chain ended, so a chain is cut short when any other in-place op
  runs between its Linear and its end (it might change an input the fused call reads late).
  Leaf modules and functions are assumed not to mutate their inputs otherwise.
- **Aliasing.** Parameters are shared, never copied: the result holds the very Parameter and
  buffer objects of the input model (tied weights stay tied, a Linear called twice stays one
  module), keeps every submodule, parameter and buffer (unused ones too) under the same names
  and in the same order, so ``state_dict`` keys are identical and checkpoints load both ways
  with ``strict=True``. Module objects are copied, so the input model itself is not changed
  (calling ``.eval()`` on the result does not switch the original).
- **Dropout.** A ``torch.nn`` dropout module right before the merge
  (``norm(dropout(dense(h)) + x)``, as in BERT) is fused with a run-time branch: the rewrite
  calls :func:`fused_linear_dropout`, which runs the fused op while the module is inactive
  (``.eval()``, or ``p == 0``) and, in training, the ops as written (the Linear, the module
  itself, the merge), so masks, scaling, random-number order and gradients are eager's; training
  gains nothing from the fusion. Such a call is never moved past another op that draws random
  numbers. A dropout call whose arguments fix it (``F.dropout(h, p, training=False)``, or
  ``p=0``, as Dynamo records ``nn.Dropout`` in eval mode) is the identity and is absorbed;
  one fixed active (``training=True``, as in a Dynamo graph captured in training), a dropout
  module with hooks, and a dropout anywhere else in the chain are kept, and the site is left.
- **Modes.** A module whose
  traced graph depends on ``self.training`` (the graphs traced in each mode differ) is not
  rewritten as a whole; its children are tried instead, so ``.train()``/``.eval()`` keep
  switching everything they switched before.
- **Shapes.** Without ``example_inputs`` shapes are unknown; ``fused_linear`` checks them at
  every call and runs the exact eager composition when fusing would change the result
  (broadcasting residual, mixed dtypes, autocast). With ``example_inputs`` they run once (in
  eval mode, without autograd) through the model, and sites whose residual does not have the
  Linear output's shape and dtype are left; ``torch.cat(..., dim=d)`` with ``d >= 0`` is taken
  as the last dimension only when the example inputs show it is, and the rewritten call then
  always concatenates along the last dimension: inputs of another rank are not supported.
- **Tracing.** Modules from ``torch.nn`` are leaves, as in ``torch.fx``. A module that does not
  trace (data-dependent control flow, ``*args``), or whose graph would lose behaviour (a
  traced-through submodule with forward hooks, ``torch.no_grad()`` or autocast entered inside
  ``forward``), is reported and its children are optimized one by one in its place. A module
  that is rewritten becomes a ``GraphModule``: its ``forward`` is the traced graph, and methods
  of its class other than ``forward`` are not carried over (attributes are). TorchScript modules
  are left as they are.
  Linear modules with hooks, and subclasses that override ``forward``, are never fused.
- **Idempotence.** The fused functions are leaves of the tracer and count as already-fused
  sites, so optimizing a result again changes nothing.
"""

from __future__ import annotations

import linecache
import logging
import math
import operator
import os
import re
import sys
from bisect import bisect_left
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node, Proxy, Tracer
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp

from .dense_chain import dense_chain
from .dense_chain_pass import dense_chain_sites, rewrite_dense_chains
from .epilogue import Activation
from .functional import as_activation, fused_linear, fused_linear_cat
from .report import Report, Site, Untraced

__all__ = [
    "SkipTracer",
    "dynamo_backend",
    "explain",
    "fuse_graph",
    "fused_linear_dropout",
    "optimize",
]

logger = logging.getLogger(__name__)

ExampleInputs = torch.Tensor | tuple | list | dict | None


def fused_linear_dropout(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dropout: nn.Module,
    residual: torch.Tensor | None = None,
    shortcut: torch.Tensor | None = None,
    gamma: torch.Tensor | float | None = None,
    alpha: float = 1.0,
    activation: Any = None,
    layer_activation: Any = None,
    shortcut_first: bool = False,
) -> torch.Tensor:
    """A site with a dropout module right before its merge: ``merge(dropout(u), r)``.

    ``u = gamma * layer_activation(x @ W.T + b)``; the merge is ``activation(u + alpha * r)``,
    or ``torch.cat`` with ``shortcut``. The choice is made at every call: while ``dropout`` is
    inactive (eval mode, or ``p == 0``, where it returns its input) the call is
    :func:`~tritskip.functional.fused_linear` (or ``fused_linear_cat``); in training it runs the
    ops as written, calling the very ``dropout`` module, so masks, scaling and random-number use
    are eager's.
    """
    if not dropout.training or getattr(dropout, "p", None) == 0:
        if shortcut is not None:
            return fused_linear_cat(x, weight, bias, shortcut=shortcut, gamma=gamma,
                                    layer_activation=layer_activation,
                                    shortcut_first=shortcut_first)  # fmt: skip
        return fused_linear(x, weight, bias, residual=residual, gamma=gamma, alpha=alpha,
                            activation=activation, layer_activation=layer_activation)  # fmt: skip
    u = as_activation(layer_activation)(F.linear(x, weight, bias))
    if gamma is not None and (isinstance(gamma, torch.Tensor) or gamma != 1.0):
        u = u * gamma
    v = dropout(u)
    if shortcut is not None:
        return torch.cat([shortcut, v] if shortcut_first else [v, shortcut], dim=-1)
    if residual is not None:
        v = v + residual if alpha == 1.0 else torch.add(v, residual, alpha=alpha)
    return as_activation(activation)(v)


# ---------------------------------------------------------------------------------------------
# Tracing

_INPLACE_OPERATORS = (
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
    "iand", "ior", "ixor", "ilshift", "irshift", "imatmul",
)  # fmt: skip


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def _internal(filename: str) -> bool:
    return filename.startswith(_TORCH_DIR) or filename == _THIS_FILE


class _InplaceProxy(Proxy):
    """A Proxy that records ``a += b`` as ``operator.iadd`` (plain ``Proxy`` records ``a + b``)."""


def _inplace_method(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    method.__name__ = f"__{op.__name__}__"
    return method


for _name in _INPLACE_OPERATORS:
    setattr(_InplaceProxy, f"__{_name}__", _inplace_method(getattr(operator, _name)))


class _Untraceable(Exception):
    """Tracing would succeed but lose part of the module's behaviour."""


def _modes() -> tuple[bool, ...]:
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
    )


def _has_call_hooks(m: nn.Module) -> bool:
    return any(
        getattr(m, name, None)
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )
    )


class SkipTracer(Tracer):
    """``torch.fx`` tracer used by the pass.

    Differences from the default: stack traces are recorded (for the report), the fused
    functions and Linears with a transposed weight (GPT-2's ``Conv1D``) are leaves,
    ``Activation`` arguments become constructor calls in the graph (so the
    generated code can rebuild them), ``+=``-style ops stay in place, and tracing fails instead
    of silently dropping what a graph cannot hold: hooks of a traced-through submodule, and a
    grad-mode or autocast change made inside ``forward`` (``with torch.no_grad():``).
    """

    def __init__(self, record_sources: bool = True) -> None:
        super().__init__(
            autowrap_functions=(fused_linear, fused_linear_cat, fused_linear_dropout, dense_chain)
        )
        self.record_sources = record_sources
        self.modes = _modes()
        self.entry = None

    def trace(self, root, concrete_args=None) -> Graph:
        self.modes = _modes()
        self.entry = sys._getframe()  # frames from here outwards are not the model's
        try:
            return super().trace(root, concrete_args)
        finally:
            self.entry = None

    def create_node(self, *args, **kwargs) -> Node:
        if _modes() != self.modes:
            raise _Untraceable(
                "forward changes the grad mode or autocast state, which a traced graph would drop"
            )
        node = super().create_node(*args, **kwargs)
        if self.record_sources:
            # The innermost frame of the model's own code, as one ``stack_trace`` entry. Cheaper
            # than ``record_stack_traces``, which symbolizes the whole stack for every node.
            frame = sys._getframe(1)
            while (
                frame is not None
                and frame is not self.entry
                and _internal(frame.f_code.co_filename)
            ):
                frame = frame.f_back
            if frame is not None and frame is not self.entry:
                code = frame.f_code
                line = linecache.getline(code.co_filename, frame.f_lineno).strip()
                node.meta["stack_trace"] = (
                    f'File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n'
                    f"    {line}"
                )
        return node

    def proxy(self, node: Node) -> Proxy:
        return _InplaceProxy(node, self)

    def create_arg(self, a: Any):
        if isinstance(a, Activation):
            return self.create_node("call_function", Activation, (a.name, a.negative_slope), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A transposed Linear stays one call, so the matcher sees it as the Linear it is.
        return _transposed_linear(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if m is not self.root and _has_call_hooks(m):
            path = self.path_of_module(m)
            if not self.is_leaf_module(m, path):
                raise _Untraceable(
                    f"submodule {path!r} has forward or backward hooks, which tracing through it "
                    "would drop"
                )
        return super().call_module(m, forward, args, kwargs)


def _trace_once(module: nn.Module, record_sources: bool) -> tuple[Graph, dict[str, Any]]:
    """Trace ``module``; return the graph and the constants the tracer attached to it."""
    before = set(vars(module))
    try:
        graph = SkipTracer(record_sources).trace(module)
    finally:
        constants = {k: module.__dict__.pop(k) for k in list(vars(module)) if k not in before}
    return graph, constants


def _trace(module: nn.Module) -> tuple[Graph, dict[str, Any]]:
    """Trace ``module`` twice, once with every ``training`` flag flipped; the graphs must agree.

    ``torch.fx`` evaluates ``self.training`` while tracing and bakes the branch into the graph
    (``F.dropout(x, training=self.training)``); such a graph would ignore ``.train()``.
    """
    graph, constants = _trace_once(module, True)
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, training in flags:
            m.training = not training
        flipped, _ = _trace_once(module, False)
    finally:
        for m, training in flags:
            m.training = training
    try:
        same = _signature(graph) == _signature(flipped)
    except RuntimeError:  # a tensor constant among the arguments
        same = graph.python_code("self").src == flipped.python_code("self").src
    if not same:
        raise _Untraceable(
            "its graph depends on self.training (train and eval mode trace differently)"
        )
    return graph, constants


def _signature(graph: Graph) -> list[tuple]:
    def name(n: Node) -> str:
        return n.name

    return [(n.op, n.target, map_arg(n.args, name), map_arg(n.kwargs, name)) for n in graph.nodes]


# ---------------------------------------------------------------------------------------------
# Copying modules while sharing tensors

_HOOK_DICTS = (
    "_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)  # fmt: skip


def _copy_containers(src: dict[str, Any]) -> dict[str, Any]:
    """The module ``__dict__`` entries that must not be shared between two module objects."""
    out = {
        "_parameters": src["_parameters"].copy(),
        "_buffers": src["_buffers"].copy(),
        "_non_persistent_buffers_set": set(src["_non_persistent_buffers_set"]),
    }
    for name in _HOOK_DICTS:
        if name in src:
            out[name] = src[name].copy()
    return out


def _clone(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A copy of the module tree that shares every Parameter and buffer object.

    Each module object is new (its own parameter, buffer, child and hook dicts, its own
    ``training`` flag); tensors and other attributes are shared. A module reachable under two
    names is cloned once, so it stays one object.
    """
    if id(module) in memo:
        return memo[id(module)]
    if isinstance(module, torch.jit.ScriptModule):  # compiled state lives in C++; left as is
        memo[id(module)] = module
        return module
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = dict(module.__dict__)
    state.update(_copy_containers(state))
    children = state["_modules"]
    state["_modules"] = type(children)(
        (name, None if child is None else _clone(child, memo)) for name, child in children.items()
    )
    if isinstance(module, GraphModule):
        # Each GraphModule owns its graph, and its forward lives on a per-instance class.
        graph = state.pop("_graph")
        new.__dict__.update(state)
        new.graph = _copy_graph(graph)
    else:
        new.__dict__.update(state)
    return new


def _copy_graph(graph: Graph) -> Graph:
    new = Graph(tracer_cls=graph._tracer_cls)
    new._codegen = graph._codegen
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _graph_module(src: nn.Module, graph: Graph, constants: dict[str, Any]) -> GraphModule:
    """A GraphModule running ``graph`` that owns exactly ``src``'s tree of modules and tensors."""
    objects = dict(constants)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in objects:
            objects[node.target] = _resolve(src, node.target)
    gm = GraphModule(objects, graph, class_name=type(src).__name__)
    # GraphModule copies only what the graph references, into placeholder containers; put the
    # source's own tree back so names, order, unused buffers and module types are unchanged.
    gm.__dict__["_modules"] = src._modules.copy()
    gm.__dict__.update(_copy_containers(src.__dict__))
    gm.training = src.training
    for key, value in src.__dict__.items():
        # A compiled call (``Module.compile()``) would run the source's own forward.
        if key not in gm.__dict__ and key != "_compiled_call_impl":
            gm.__dict__[key] = value
    for key, value in constants.items():
        if "." not in key:
            setattr(gm, key, value)
    return gm


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


# ---------------------------------------------------------------------------------------------
# Recognizing ops


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_view(node: Any) -> bool:
    return isinstance(node, Node) and (
        (node.op == "call_method" and node.target in ("view", "reshape"))
        or (node.op == "call_function" and node.target is torch.reshape)
    )


# Modules known to compute a Linear with the weight stored transposed, as ``[in, out]``, and
# ``forward(x) = x @ weight + bias``, by (module, class name); matched by exact class, so a
# subclass with its own forward is traced through instead.
_TRANSPOSED_LINEARS = {
    ("transformers.pytorch_utils", "Conv1D"),  # GPT-2, GPT, and models copied from them
    ("transformers.modeling_utils", "Conv1D"),  # the same class in transformers < 4.39
}


def _transposed_linear(m: Any) -> bool:
    """Whether ``m`` is a Linear whose ``weight`` is stored as ``[in, out]`` (GPT-2's ``Conv1D``)."""
    if (
        not isinstance(m, nn.Module)
        or (type(m).__module__, type(m).__name__) not in _TRANSPOSED_LINEARS
    ):
        return False
    # Read the dicts directly: while tracing, attribute access returns proxies.
    w, b = m._parameters.get("weight"), m._parameters.get("bias")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return False
    return b is None or (isinstance(b, torch.Tensor) and b.shape == (w.shape[1],))


_WRITTEN_OUT_LIMIT = 24  # nodes looked at after the Linear for a written-out activation
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.tanh, torch.sigmoid,
    torch.erf, torch.exp, torch.sqrt, torch.rsqrt, torch.reciprocal, F.tanh, F.sigmoid,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "tanh", "sigmoid", "erf", "exp", "sqrt", "rsqrt",
    "reciprocal", "__add__", "__radd__", "__mul__", "__rmul__", "__sub__", "__rsub__",
    "__truediv__", "__pow__",
}  # fmt: skip
_PROBE = torch.cat([torch.linspace(-10, 10, 2001, dtype=torch.float64), torch.tensor([0.0])])


def _elementwise(node: Node) -> bool:
    """An out-of-place elementwise op whose non-tensor arguments are plain numbers."""
    if node.op == "call_function":
        ok = _hashable(node.target) and node.target in _ELEMENTWISE_FUNCTIONS
    else:
        ok = node.op == "call_method" and node.target in _ELEMENTWISE_METHODS
    values = (*node.args, *node.kwargs.values())
    return ok and all(isinstance(a, Node) or _number(a) for a in values)


def _probe_activation(x: Node, region: list[Node]) -> Activation | None:
    """The epilogue activation that ``region`` computes from ``x``, judged on ``_PROBE``."""
    env: dict[Node, Any] = {x: _PROBE}

    def value(a: Any) -> Any:
        return env[a] if isinstance(a, Node) else a

    try:
        for node in region:
            args = [value(a) for a in node.args]
            kwargs = {k: value(v) for k, v in node.kwargs.items()}
            if node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            else:
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    except Exception:
        return None
    y = env[region[-1]]
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape or y.dtype != _PROBE.dtype:
        return None
    for name in ("gelu", "gelu_tanh", "silu", "sigmoid", "tanh"):
        act = Activation(name)
        if torch.allclose(y, act(_PROBE), rtol=1e-12, atol=1e-12):
            return act
    return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# function -> (activation name, parameters after the input as (name, default))
_ACT_FUNCTIONS: dict[Any, tuple[str, tuple[tuple[str, Any], ...]]] = {
    F.relu: ("relu", (("inplace", False),)),
    torch.relu: ("relu", ()),
    torch.relu_: ("relu", ()),
    F.leaky_relu: ("leaky_relu", (("negative_slope", 0.01), ("inplace", False))),
    F.leaky_relu_: ("leaky_relu", (("negative_slope", 0.01),)),
    F.gelu: ("gelu", (("approximate", "none"),)),
    F.silu: ("silu", (("inplace", False),)),
    torch.tanh: ("tanh", ()),
    torch.tanh_: ("tanh", ()),
    F.tanh: ("tanh", ()),
    torch.sigmoid: ("sigmoid", ()),
    torch.sigmoid_: ("sigmoid", ()),
    F.sigmoid: ("sigmoid", ()),
}
_ACT_METHODS = {
    "relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh",
    "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
}  # fmt: skip
_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)

_MUL_FUNCTIONS = {operator.mul: False, torch.mul: False, operator.imul: True}
_MUL_METHODS = {"mul": False, "mul_": True}
# target -> (sign, in place, accepts alpha)
_ADD_FUNCTIONS = {
    operator.add: (1, False, False),
    operator.iadd: (1, True, False),
    torch.add: (1, False, True),
    operator.sub: (-1, False, False),
    operator.isub: (-1, True, False),
    torch.sub: (-1, False, True),
    torch.subtract: (-1, False, True),
}
_ADD_METHODS = {
    "add": (1, False), "add_": (1, True), "sub": (-1, False), "sub_": (-1, True),
    "subtract": (-1, False), "subtract_": (-1, True),
}  # fmt: skip
_CAT_FUNCTIONS = {torch.cat: "dim", torch.concat: "dim", torch.concatenate: "axis"}
# function -> (name of its training flag, the flag's default; None when it has to be given)
_DROPOUT_FUNCTIONS: dict[Any, tuple[str, bool | None]] = {
    F.dropout: ("training", True), F.dropout1d: ("training", True),
    F.dropout2d: ("training", True), F.dropout3d: ("training", True),
    F.alpha_dropout: ("training", False), F.feature_alpha_dropout: ("training", False),
    torch.dropout: ("train", None), torch.alpha_dropout: ("train", None),
    torch.feature_alpha_dropout: ("train", None),
}  # fmt: skip
# Ops that draw from the global random generator: a fused call holding a dropout must not be
# moved past one of them, or the two would take their random numbers in the other order.
_RANDOM_FUNCTIONS = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.randperm, torch.bernoulli, torch.multinomial, torch.normal,
    torch.poisson, F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_,
}  # fmt: skip
_RANDOM_METHODS = {
    "bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
    "cauchy_", "log_normal_", "multinomial",
}  # fmt: skip
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
_NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "stride", "ndimension"}
_INPLACE_FUNCTIONS = {getattr(operator, name) for name in _INPLACE_OPERATORS} | {operator.setitem}


@dataclass(frozen=True)
class _Linear:
    node: Node  # the node whose value is the Linear's output
    label: str  # "Linear", "F.linear", "addmm" or the class name of a transposed Linear
    x: Any
    weight: Any  # a Node, or None for a module (get_attr nodes are made on rewrite)
    bias: Any
    module: nn.Module | None
    out_features: int | None
    name: str
    ineligible: str = ""
    transposed: bool = False  # the weight is stored as [in, out]
    prelude: tuple[Node, ...] = ()  # earlier nodes of a flattened addmm, erased with the chain


@dataclass(frozen=True)
class _State:
    """A chain matched so far; ``stage`` orders the steps (see ``_Matcher._extend``)."""

    nodes: tuple[Node, ...]
    steps: tuple[str, ...]
    stage: int = 0
    inner: Activation | None = None
    gamma: Node | None = None
    scale: float = 1.0
    residual: Node | None = None
    alpha: float = 1.0
    outer: Activation | None = None
    shortcut: Node | None = None
    shortcut_first: bool = False
    dropout: str | None = None  # a dropout module right before the merge, by qualified name
    dropout_node: Node | None = None
    complete: bool = True  # False while the chain ends in a dropout that awaits its merge


_AFTER_LINEAR, _AFTER_INNER, _AFTER_SCALE, _AFTER_DROPOUT, _AFTER_ADD, _DONE = range(6)
_DYNAMO_ROOT = re.compile(r"^L\['[^']*'\]\.?")  # Dynamo names modules from the local "L['self']"
_NEXT_STEPS = {
    _AFTER_LINEAR: {"activation", "scale", "add", "cat", "dropout"},
    _AFTER_INNER: {"activation", "scale", "add", "cat", "dropout"},
    _AFTER_SCALE: {"activation", "add", "cat", "dropout"},
    _AFTER_DROPOUT: {"add", "cat"},
    _AFTER_ADD: {"activation"},
}


def _step_class(kind: str) -> str:
    if kind in ("scale", "add", "cat", "dropout"):
        return kind
    return "add" if kind == "sub" else "activation"


def _source(node: Node) -> str:
    """``"file:line"`` of the innermost frame of the model's own code that made ``node``."""
    trace = node.meta.get("stack_trace") or ""
    frames = [f for f in _FRAME.findall(trace) if not _internal(f[0])]
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _meta(node: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype of a node's value when a shape pass or Dynamo recorded them."""
    if not isinstance(node, Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        shape, dtype = tm.shape, tm.dtype
    else:
        v = node.meta.get("val", node.meta.get("example_value"))
        if not isinstance(v, torch.Tensor):
            return None
        shape, dtype = v.shape, v.dtype
    if not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape), dtype


class _Matcher:
    """Finds and rewrites the sites of one graph. Time is linear in the number of nodes."""

    def __init__(self, graph: Graph, root: nn.Module, prefix: str) -> None:
        self.root = root  # resolves call_module and get_attr targets
        self.graph = graph
        self.prefix = prefix
        self.changed = False
        self._written_cache: dict[Node, Any] = {}

    # -- classification ------------------------------------------------------------------------

    def _module(self, node: Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        try:
            return self.root.get_submodule(node.target)
        except AttributeError:
            return None

    def _activation(self, node: Node) -> tuple[Any, Activation] | None:
        """``(input, activation)`` when ``node`` applies a supported activation."""
        if node.op == "call_module":
            m = self._module(node)
            if type(m) not in _ACT_MODULES or _has_call_hooks(m):
                return None
            if len(node.args) != 1 or node.kwargs:
                return None
            if isinstance(m, nn.LeakyReLU):
                return node.args[0], Activation("leaky_relu", float(m.negative_slope))
            if isinstance(m, nn.GELU):
                name = {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
                return (node.args[0], Activation(name)) if name else None
            name = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
            return node.args[0], Activation(name[type(m)])
        if node.op == "call_method":
            name = _ACT_METHODS.get(node.target)
            if name is None or len(node.args) != 1 or node.kwargs:
                return None
            return node.args[0], Activation(name)
        if node.op != "call_function":
            return None
        try:
            spec = _ACT_FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
        if spec is None:
            return None
        name, params = spec
        names = [p for p, _ in params]
        if len(node.args) - 1 > len(params) or set(node.kwargs) - {"input", *names}:
            return None
        values = dict(params)
        for (p, _), v in zip(params, node.args[1:], strict=False):
            values[p] = v
        values.update({k: v for k, v in node.kwargs.items() if k != "input"})
        x = _arg(node, 0, "input")
        if any(isinstance(v, Node) for v in values.values()) or not isinstance(x, Node):
            return None
        if name == "gelu":
            name = {"none": "gelu", "tanh": "gelu_tanh"}.get(values["approximate"])
            return (x, Activation(name)) if name else None
        if name == "leaky_relu":
            slope = values["negative_slope"]
            return (x, Activation(name, float(slope))) if _number(slope) else None
        return x, Activation(name)

    def _mul(self, node: Node) -> tuple[Any, Any, bool] | None:
        if node.op == "call_function":
            inplace = _MUL_FUNCTIONS.get(node.target) if _hashable(node.target) else None
        elif node.op == "call_method":
            inplace = _MUL_METHODS.get(node.target)
        else:
            return None
        if inplace is None or len(node.args) != 2 or node.kwargs:
            return None
        return node.args[0], node.args[1], inplace

    def _add(self, node: Node) -> tuple[Any, Any, int, float, bool] | None:
        """``(a, b, sign, alpha, in place)`` for ``a + sign * alpha * b``."""
        if node.op == "call_function":
            spec = _ADD_FUNCTIONS.get(node.target) if _hashable(node.target) else None
            if spec is None:
                return None
            sign, inplace, takes_alpha = spec
        elif node.op == "call_method":
            spec = _ADD_METHODS.get(node.target)
            if spec is None:
                return None
            (sign, inplace), takes_alpha = spec, True
        else:
            return None
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        alpha = _arg(node, 2, "alpha", 1) if takes_alpha else 1
        extra = set(node.kwargs) - {"input", "other", "alpha"}
        if len(node.args) > (3 if takes_alpha else 2) or extra or not _number(alpha):
            return None
        return a, b, sign, float(alpha), inplace

    def _cat(self, node: Node) -> tuple[Any, Any] | None:
        if node.op != "call_function" or not _hashable(node.target):
            return None
        dim_name = _CAT_FUNCTIONS.get(node.target)
        if dim_name is None or set(node.kwargs) - {"tensors", dim_name} or len(node.args) > 2:
            return None
        return _arg(node, 0, "tensors"), _arg(node, 1, dim_name, 0)

    def _dropout(self, node: Node) -> tuple[Any, str] | None:
        """``(input, mode)`` for a dropout; ``mode`` says when it changes its input.

        ``"module"``: a ``torch.nn`` dropout module, active in training only (read at run time);
        ``"off"``: a call that is the identity as written (``training=False`` or ``p=0``, as
        Dynamo records ``nn.Dropout`` in eval mode); ``"on"``: active as written;
        ``"opaque"``: a dropout module with hooks or of a subclass, left as it is.
        """
        if node.op == "call_module":
            m = self._module(node)
            if not isinstance(m, nn.modules.dropout._DropoutNd):
                return None
            x = _arg(node, 0, "input")
            own = type(m).__module__ == nn.modules.dropout.__name__
            if not own or _has_call_hooks(m) or len(node.args) != 1 or node.kwargs:
                return x, "opaque"
            return x, "module"
        if node.op != "call_function" or not _hashable(node.target):
            return None
        spec = _DROPOUT_FUNCTIONS.get(node.target)
        if spec is None:
            return None
        flag, default = spec
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, flag, default)
        if training is False or (_number(p) and p == 0):
            return _arg(node, 0, "input"), "off"
        return _arg(node, 0, "input"), "on"

    def _draws_random(self, node: Node) -> bool:
        """Whether ``node`` takes numbers from the global random generator (by op name)."""
        if node.op == "call_module":
            m = self._module(node)
            return isinstance(m, _RANDOM_MODULES) or (
                m is not None and type(m).__module__.split(".")[0] != "torch"
            )
        if node.op == "call_method":
            return node.target in _RANDOM_METHODS
        if node.op != "call_function" or not _hashable(node.target):
            return False
        if node.target in _RANDOM_FUNCTIONS:
            return True
        drop = self._dropout(node)
        return drop is not None and drop[1] != "off"

    def _written_out_activation(self, x: Node) -> tuple[tuple[Node, ...], Activation] | None:
        """An activation spelled as elementwise arithmetic on ``x`` alone, with its nodes.

        GPT-2's ``gelu_new`` is ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``.
        The region is grown in graph order from ``x`` through elementwise ops whose tensor
        inputs are ``x`` or the region; once nothing outside reads any of it but its last
        value, that value, a function of ``x`` alone, is evaluated in float64 on points
        spread over [-10, 10] and compared with each activation of the epilogue.
        """
        if x in self._written_cache:
            return self._written_cache[x]
        result = None
        region: list[Node] = []
        inside = {x}
        node = x.next
        for _ in range(_WRITTEN_OUT_LIMIT):
            if node.op in ("output", "root"):
                break
            args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, Node)]
            if any(a in inside for a in args):
                if not _elementwise(node) or any(a not in inside for a in args):
                    break
                region.append(node)
                inside.add(node)
                escaping = [n for n in (x, *region[:-1]) if any(u not in inside for u in n.users)]
                if not escaping and len(region) > 1:
                    act = _probe_activation(x, region)
                    if act is not None:
                        result = (tuple(region), act)
                    break
            node = node.next
        self._written_cache[x] = result
        return result

    def _is_dropout(self, node: Node) -> bool:
        if node.op == "call_module":
            return isinstance(self._module(node), nn.modules.dropout._DropoutNd)
        return (
            node.op == "call_function"
            and _hashable(node.target)
            and (node.target in _DROPOUT_FUNCTIONS)
        )

    def _kind(self, node: Node) -> str | None:
        """A short name for an op the matcher treats as part of an epilogue, else None."""
        act = self._activation(node)
        if act is not None:
            return str(act[1])
        if self._mul(node) is not None:
            return "scale"
        add = self._add(node)
        if add is not None:
            return "add" if add[2] > 0 else "sub"
        if self._cat(node) is not None:
            return "cat"
        if self._is_dropout(node):
            return "dropout"
        return None

    def _is_inplace(self, node: Node) -> bool:
        if node.op == "call_function":
            if _hashable(node.target) and node.target in _INPLACE_FUNCTIONS:
                return True
            name = getattr(node.target, "__name__", "")
            return node.kwargs.get("inplace") is True or (
                name.endswith("_") and not name.startswith("_")
            )
        if node.op == "call_method":
            t = node.target
            return (t.endswith("_") and not t.startswith("_")) or t in ("__setitem__", "__iadd__")
        if node.op == "call_module":
            return getattr(self._module(node), "inplace", False) is True
        return False

    def _maybe_tensor(self, node: Any, depth: int = 0) -> bool:
        if not isinstance(node, Node):
            return False
        if "type" in node.meta and isinstance(node.meta["type"], type):
            return issubclass(node.meta["type"], torch.Tensor)
        if node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
            return False
        if node.op == "call_function" and node.target in (getattr, len):
            return False
        if node.op == "call_function" and node.target is operator.getitem and depth < 8:
            return self._maybe_tensor(node.args[0], depth + 1)
        return True

    def _linear(self, node: Node) -> _Linear | None:
        if node.op == "call_module":
            m = self._module(node)
            transposed = _transposed_linear(m)
            if not isinstance(m, nn.Linear) and not transposed:
                return None
            x = _arg(node, 0, "input")
            if len(node.args) > 1 or set(node.kwargs) - {"input"} or not isinstance(x, Node):
                return None
            ineligible = ""
            if not transposed and type(m).forward is not nn.Linear.forward:
                ineligible = f"{type(m).__name__} overrides Linear.forward"
            elif _has_call_hooks(m):
                ineligible = "the Linear has forward or backward hooks"
            name = _join(self.prefix, node.target)
            label = type(m).__name__ if transposed else "Linear"
            n = m.weight.shape[1] if transposed else m.out_features
            return _Linear(node, label, x, None, None, m, n, name, ineligible, transposed)
        if node.op == "call_function" and node.target is torch.addmm:
            return self._addmm(node)
        if node.op == "call_function" and node.target is F.linear:
            x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
            if len(node.args) > 3 or set(node.kwargs) - {"input", "weight", "bias"}:
                return None
            if not isinstance(x, Node) or not isinstance(w, Node):
                return None
            wm = self._value_meta(w)
            n = wm[0][0] if wm is not None and len(wm[0]) == 2 else None
            return _Linear(node, "F.linear", x, w, b, None, n, self._owner(node))
        return None

    def _addmm(self, node: Node) -> _Linear | None:
        """``addmm(b, x, W)``: a Linear with the weight stored as ``[in, out]``.

        GPT-2's ``Conv1D`` flattens its input first and restores the leading dims after
        (``addmm(b, x.view(-1, K), W).view(*lead, N)``); with shapes recorded (Dynamo, or
        ``example_inputs``) that is taken whole, as a Linear on the unflattened input.
        """
        b, x2, w = (_arg(node, i, name) for i, name in enumerate(("input", "mat1", "mat2")))
        extra = set(node.kwargs) - {"input", "mat1", "mat2", "beta", "alpha"}
        if len(node.args) > 3 or extra or not all(isinstance(v, Node) for v in (b, x2, w)):
            return None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        wm, bm, xm = self._value_meta(w), self._value_meta(b), _meta(x2)
        if wm is None or bm is None or xm is None or len(wm[0]) != 2 or len(xm[0]) != 2:
            return None
        n = wm[0][1]
        if bm[0] != (n,):  # a bias of [M, N] is an added tensor, not a Linear's bias
            return None
        out, x, prelude = node, x2, ()
        users = list(node.users)
        if _is_view(x2) and len(x2.users) == 1 and len(users) == 1 and _is_view(users[0]):
            src, um = x2.args[0], _meta(users[0])
            sm = _meta(src)
            if sm is not None and um is not None and len(sm[0]) >= 2 and sm[0][-1] == xm[0][1]:
                lead = sm[0][:-1]
                if math.prod(lead) == xm[0][0] and um[0] == (*lead, n):
                    out, x, prelude = users[0], src, (x2, node)
        return _Linear(
            out, "addmm", x, w, b, None, n, self._owner(node), transposed=True, prelude=prelude
        )

    def _operands(self, lin: _Linear) -> tuple[Any, Any]:
        """``(weight, bias)`` nodes in ``F.linear``'s layout, made at the insertion point."""
        graph = self.graph
        if lin.module is not None:
            weight = graph.get_attr(f"{lin.node.target}.weight")
            has_bias = getattr(lin.module, "bias", None) is not None
            bias = graph.get_attr(f"{lin.node.target}.bias") if has_bias else None
        else:
            weight, bias = lin.weight, lin.bias
        if lin.transposed:
            weight = graph.call_method("t", (weight,))
        return weight, bias

    def _owner(self, node: Node) -> str:
        stack = node.meta.get("nn_module_stack")
        inner = next(reversed(stack.values()))[0] if stack else ""
        if not isinstance(inner, str):
            inner = ""
        return _join(self.prefix, _DYNAMO_ROOT.sub("", inner))

    def _value_meta(self, node: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
        """Shape and dtype of a node, reading ``get_attr`` tensors directly."""
        if isinstance(node, Node) and node.op == "get_attr":
            try:
                v = _resolve(self.root, node.target)
            except AttributeError:
                return None
            if isinstance(v, torch.Tensor):
                return tuple(v.shape), v.dtype
            return None
        return _meta(node)

    # -- matching ------------------------------------------------------------------------------

    def _extend(self, lin: _Linear, st: _State) -> tuple[_State | None, str, str]:
        """The chain one op longer, or ``(None, reason, op)`` where it stops.

        ``reason`` is empty when the next op is simply not part of any pattern.
        """
        cur = st.nodes[-1]
        last = st.steps[-1]
        users = list(cur.users)
        if st.stage == _DONE or not users:
            return None, "", ""
        if st.stage != _AFTER_DROPOUT:
            written = self._written_out_activation(cur)
            if written is not None:
                region, act = written
                step = (*st.steps, str(act))
                if st.stage == _AFTER_LINEAR:
                    new = replace(st, stage=_AFTER_INNER, inner=act)
                else:
                    new = replace(st, stage=_DONE, outer=act)
                return replace(new, nodes=(*st.nodes, *region), steps=step), "", ""
        if len(users) > 1:
            # Worth reporting only when some user is an op that could have continued the chain.
            allowed = _NEXT_STEPS[st.stage]
            kinds = [k for k in map(self._kind, users) if k and _step_class(k) in allowed]
            if kinds:
                return None, f"the {last} output has {len(users)} users", kinds[0]
            return None, "", ""
        nxt = users[0]
        if nxt.op == "output":
            return None, "", ""
        extended = (*st.nodes, nxt)

        act = self._activation(nxt)
        if act is not None and act[0] is cur and st.stage != _AFTER_DROPOUT:
            step = (*st.steps, str(act[1]))
            if st.stage == _AFTER_LINEAR:
                return (
                    replace(st, nodes=extended, steps=step, stage=_AFTER_INNER, inner=act[1]),
                    "",
                    "",
                )
            return replace(st, nodes=extended, steps=step, stage=_DONE, outer=act[1]), "", ""

        mul = self._mul(nxt)
        if mul is not None and st.stage <= _AFTER_INNER:
            a, b, inplace = mul
            if a is cur and b is not cur:
                other = b
            elif b is cur and not inplace:
                other = a
            else:
                return None, "", ""
            step = (*st.steps, "scale")
            if _number(other):
                new = replace(st, scale=st.scale * float(other))
            else:
                m = self._value_meta(other) if isinstance(other, Node) else None
                n = lin.out_features
                if m is None:
                    return None, "", ""
                if m[0] not in ((), (n,)) and not (n is None and len(m[0]) == 1):
                    if other.op != "get_attr":
                        return None, "", ""
                    reason = f"scale of shape {list(m[0])} is neither a scalar nor one per channel"
                    return None, reason, "scale"
                new = replace(st, gamma=other)
            return replace(new, nodes=extended, steps=step, stage=_AFTER_SCALE), "", ""

        add = self._add(nxt)
        if add is not None and st.stage <= _AFTER_DROPOUT:
            a, b, sign, alpha, inplace = add
            op = "add" if sign > 0 else "sub"
            if a is cur and b is not cur:
                residual, new = b, replace(st, alpha=sign * alpha)
            elif b is cur and a is not cur:
                if inplace:
                    return None, f"the in-place {op} writes into the residual", op
                residual, new = a, replace(st, scale=st.scale * sign * alpha)
            else:
                return None, "", ""
            if not self._maybe_tensor(residual) or residual in st.nodes:
                return None, "", ""
            reason = self._same_tensor(lin, residual, "residual")
            if reason:
                return None, reason, op
            step = (*st.steps, op)
            new = replace(new, nodes=extended, steps=step, stage=_AFTER_ADD, complete=True)
            return replace(new, residual=residual), "", ""

        cat = self._cat(nxt)
        if cat is not None and st.stage <= _AFTER_DROPOUT:
            parts, dim = cat
            if not isinstance(parts, (list, tuple)) or cur not in parts:
                return None, "", ""
            if len(parts) != 2:
                return None, f"cat of {len(parts)} tensors (two are supported)", "cat"
            first = parts[1] is cur
            shortcut = parts[0] if first else parts[1]
            if shortcut is cur or not self._maybe_tensor(shortcut) or shortcut in st.nodes:
                return None, "", ""
            reason = self._last_dim(lin, dim) or self._same_tensor(lin, shortcut, "shortcut")
            if reason:
                return None, reason, "cat"
            step = (*st.steps, "cat")
            new = replace(st, shortcut=shortcut, shortcut_first=first, complete=True)
            return replace(new, nodes=extended, steps=step, stage=_DONE), "", ""

        drop = self._dropout(nxt)
        if drop is not None and drop[0] is cur and len(nxt.users) == 1:
            after = self._kind(next(iter(nxt.users)))
            merge = after in ("add", "sub", "cat")
            if merge and st.stage <= _AFTER_SCALE and drop[1] in ("module", "off"):
                step = (*st.steps, "dropout")
                new = replace(st, nodes=extended, steps=step, stage=_AFTER_DROPOUT, complete=False)
                if drop[1] == "module":
                    new = replace(new, dropout=nxt.target, dropout_node=nxt)
                return new, "", ""
            if merge and drop[1] == "on":
                reason = f"dropout between the {last} and the {after} is active (training=True)"
                return None, reason, "dropout"
            if merge or (after and st.stage == _AFTER_LINEAR):
                return None, f"dropout between the {last} and the {after} is kept", "dropout"
        return None, "", ""

    def _same_tensor(self, lin: _Linear, other: Node, role: str) -> str:
        """Why ``other`` cannot be fused as residual/shortcut, judged by recorded shapes."""
        out, got = _meta(lin.node), _meta(other)
        if out is None or got is None:
            return ""
        (shape, dtype), (other_shape, other_dtype) = out, got
        if role == "residual" and other_shape != shape:
            return (
                f"residual shape {list(other_shape)} differs from the Linear output {list(shape)}"
            )
        if role == "shortcut" and (
            len(other_shape) != len(shape) or other_shape[:-1] != shape[:-1]
        ):
            return (
                f"shortcut shape {list(other_shape)} does not match the Linear output {list(shape)}"
            )
        if other_dtype != dtype:
            return f"{role} dtype {other_dtype} differs from the Linear output dtype {dtype}"
        return ""

    def _last_dim(self, lin: _Linear, dim: Any) -> str:
        if not isinstance(dim, int) or isinstance(dim, bool):
            return "cat along a dimension computed at run time"
        if dim == -1:
            return ""
        m = _meta(lin.node)
        if m is None:
            return f"cat along dim {dim}: the last dimension is unknown without example_inputs"
        rank = len(m[0])
        if dim != rank - 1:
            return f"cat along dim {dim}, not the last dimension ({rank - 1})"
        return ""

    def _hazard(self, lin: _Linear, st: _State) -> str:
        """What forbids moving the chain's work to its end: an in-place op outside the chain
        between its Linear and its end (``"in-place"``), or, for a chain holding a dropout
        module, another op drawing random numbers between that dropout and the end
        (``"random"``); ``""`` when nothing does."""
        lo, hi = self.index[(*lin.prelude, *st.nodes)[0]], self.index[st.nodes[-1]]
        inside = bisect_left(self.inplace_at, hi) - bisect_left(self.inplace_at, lo + 1)
        own = sum(1 for n in (*lin.prelude, *st.nodes)[1:-1] if self._is_inplace(n))
        if inside > own:
            return "in-place"
        if st.dropout_node is not None:
            d = self.index[st.dropout_node]
            if bisect_left(self.random_at, hi) - bisect_left(self.random_at, d + 1):
                return "random"
        return ""

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> list[Site]:
        nodes = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(nodes)}
        # Dense chains first: their steps would otherwise be fused one cat at a time.
        chains = rewrite_dense_chains(self)
        if chains:
            nodes = list(self.graph.nodes)
            self.index = {n: i for i, n in enumerate(nodes)}
        self.inplace_at = [i for i, n in enumerate(nodes) if self._is_inplace(n)]
        self.random_at = [i for i, n in enumerate(nodes) if self._draws_random(n)]
        sites = []
        for node in nodes:
            if node in chains:
                sites.extend(chains[node])
                continue
            if node.op == "call_function" and node.target is dense_chain:
                sites.extend(dense_chain_sites(self, node))
                continue
            if node.op == "call_function" and node.target in _FUSED_FUNCTIONS:
                sites.append(self._already_fused(node))
                continue
            lin = self._linear(node)
            if lin is not None:
                site = self._site(lin)
                if site is not None:
                    sites.append(site)
        return sites

    def _site(self, lin: _Linear) -> Site | None:
        states = [_State(nodes=(lin.node,), steps=(lin.label,))]
        while True:
            nxt, reason, stop = self._extend(lin, states[-1])
            if nxt is None:
                break
            states.append(nxt)
        longest, best = states[-1], None
        complete = [s for s in states[1:] if s.complete]
        if complete:
            best = next((s for s in reversed(complete) if not self._hazard(lin, s)), None)
            if best is not complete[-1]:
                cut = complete[-1].steps[len(best.steps) if best else 1]
                if self._hazard(lin, complete[-1]) == "random":
                    merge = complete[-1].steps[complete[-1].steps.index("dropout") + 1]
                    reason = f"another op draws random numbers between the dropout and the {merge}"
                else:
                    reason = f"an in-place op runs between the {lin.label} and the {cut}"
                stop = ""
        if lin.ineligible and (len(states) > 1 or reason):
            reason, best = lin.ineligible, None
        if best is None and not reason:
            return None
        final = best or longest
        steps = final.steps if best or not stop else (*longest.steps, stop)
        m = _meta(final.nodes[-1])
        common = {
            "module": lin.name,
            "source": _source(lin.prelude[-1] if lin.prelude else lin.node),
            "pattern": " → ".join(steps),
            "shape": m[0] if m else None,
        }
        if best is None:
            return Site(fused=False, reason=reason, **common)
        self._rewrite(lin, best)
        if not reason and best.dropout is not None:
            reason = (
                "fused while the dropout is inactive (eval mode); in training it runs as written"
            )
        return Site(fused=True, note=reason, **common)

    def _already_fused(self, node: Node) -> Site:
        kw = node.kwargs
        steps = [node.target.__name__]
        if kw.get("layer_activation") is not None:
            steps.append(_activation_text(kw["layer_activation"]))
        if kw.get("gamma") is not None:
            steps.append("scale")
        if kw.get("dropout") is not None:
            steps.append("dropout")
        if kw.get("shortcut") is not None:
            steps.append("cat")
        elif kw.get("residual") is not None:
            steps.append("add")
        if kw.get("activation") is not None:
            steps.append(_activation_text(kw["activation"]))
        w = _arg(node, 1, "weight")
        if isinstance(w, Node) and w.op == "call_method" and w.target == "t":
            w = w.args[0]
        name = self._owner(node)
        if isinstance(w, Node) and w.op == "get_attr" and w.target.endswith(".weight"):
            name = _join(self.prefix, w.target.rpartition(".")[0])
        m = _meta(node)
        return Site(
            module=name,
            source=_source(node),
            pattern=" → ".join(steps),
            fused=True,
            shape=m and m[0],
            already_fused=True,
        )

    # -- rewriting -----------------------------------------------------------------------------

    def _activation_arg(self, act: Activation | None) -> Any:
        if act is None:
            return None
        if act.name != "leaky_relu" or act.negative_slope == Activation().negative_slope:
            return act.name
        return self.graph.call_function(Activation, (act.name, act.negative_slope))

    def _rewrite(self, lin: _Linear, st: _State) -> None:
        graph, end = self.graph, st.nodes[-1]
        with graph.inserting_before(end):
            weight, bias = self._operands(lin)
            gamma: Any = st.gamma
            if gamma is not None and st.scale != 1.0:
                gamma = graph.call_function(operator.mul, (gamma, st.scale))
            elif gamma is None and st.scale != 1.0:
                gamma = st.scale
            kwargs: dict[str, Any] = {}
            if st.dropout is not None:
                target = fused_linear_dropout
                kwargs["dropout"] = graph.get_attr(st.dropout)
            else:
                target = fused_linear if st.shortcut is None else fused_linear_cat
            if st.shortcut is not None:
                kwargs["shortcut"] = st.shortcut
            elif st.residual is not None:
                kwargs["residual"] = st.residual
            if gamma is not None:
                kwargs["gamma"] = gamma
            if st.alpha != 1.0:
                kwargs["alpha"] = st.alpha
            if st.outer is not None:
                kwargs["activation"] = self._activation_arg(st.outer)
            if st.inner is not None:
                kwargs["layer_activation"] = self._activation_arg(st.inner)
            if st.shortcut_first:
                kwargs["shortcut_first"] = True
            fused = graph.call_function(target, (lin.x, weight, bias), kwargs)
        fused.meta.update({k: v for k, v in end.meta.items() if k not in ("stack_trace",)})
        for key in ("stack_trace", "nn_module_stack"):
            if key in lin.node.meta:
                fused.meta[key] = lin.node.meta[key]
        fused.meta["is_wrapped"] = True  # the generated code marks the call as a tracing leaf
        end.replace_all_uses_with(fused)
        for n in reversed((*lin.prelude, *st.nodes)):
            graph.erase_node(n)
        self.changed = True


_FUSED_FUNCTIONS = (fused_linear, fused_linear_cat, fused_linear_dropout)


def _activation_text(arg: Any) -> str:
    if isinstance(arg, Node) and arg.target is Activation:
        return str(Activation(*arg.args, **arg.kwargs))
    return str(arg)


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def fuse_graph(gm: GraphModule, *, prefix: str = "") -> list[Site]:
    """Rewrite the sites of ``gm``'s graph in place and return one :class:`Site` per candidate.

    Shapes recorded on the nodes (``tensor_meta`` from ``ShapeProp``, or ``val`` /
    ``example_value`` from Dynamo) are used when present. ``prefix`` is prepended to the module
    names in the report. This is the matcher behind :func:`optimize`; it works on any FX graph
    whose Linear layers are ``call_module`` or ``F.linear`` calls.
    """
    matcher = _Matcher(gm.graph, gm, prefix)
    sites = matcher.run()
    if matcher.changed:
        gm.graph.lint()
        gm.recompile()
    return sites


def dynamo_backend(gm: GraphModule, example_inputs: list[Any]) -> Any:
    """A ``torch.compile`` backend that fuses the sites of each captured graph and runs it eagerly.

    Dynamo captures models that ``torch.fx`` symbolic tracing cannot (``**kwargs``, tuple
    unpacking, data-dependent code split into several graphs), so this reaches sites that
    :func:`optimize` reports as untraced: ``torch.compile(model, backend="tritskip")`` (the
    name is registered through the ``torch_dynamo_backends`` entry point when the package is
    installed; importing tritskip registers nothing). Shapes come from Dynamo's example values.
    Dynamo guards on each module's ``training`` flag, so a mode switch recompiles and dropout
    calls arrive with their mode fixed. :func:`explain` with ``dynamo=True`` reports the sites.
    """
    sites = fuse_graph(gm)
    logger.debug("dynamo graph: %d of %d sites fused", sum(s.fused for s in sites), len(sites))
    return gm.forward


# ---------------------------------------------------------------------------------------------
# Whole models


def _as_call(example_inputs: ExampleInputs) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` holding copies of the tensors, so a model that mutates its inputs
    leaves the caller's example inputs alone."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, dict):
        return (), {k: _copied(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(_copied(v) for v in example_inputs), {}
    return (_copied(example_inputs),), {}


def _copied(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_copied(x) for x in v)
    if isinstance(v, dict):
        return {k: _copied(x) for k, x in v.items()}
    return v


class _EvalNoGrad:
    """Run a module tree in eval mode without autograd, restoring every flag afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.flags = [(m, m.training) for m in module.modules()]
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        for m, _ in self.flags:
            m.training = False
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        for m, training in self.flags:
            m.training = training


def _bind(graph: Graph, call: tuple[tuple, dict]) -> list[Any] | None:
    """The placeholder values for a call, or None when they cannot be matched up."""
    args, kwargs = call
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(args) > len(placeholders) or set(kwargs) - {p.target for p in placeholders}:
        return None
    values = []
    for i, p in enumerate(placeholders):
        if p.target.startswith("*"):
            return None
        if i < len(args):
            values.append(args[i])
        elif p.target in kwargs:
            values.append(kwargs[p.target])
        elif p.args:
            values.append(p.args[0])
        else:
            return None
    return values


def _propagate(gm: GraphModule, call: tuple[tuple, dict], name: str, strict: bool) -> None:
    values = _bind(gm.graph, call)
    try:
        if values is None:
            raise TypeError("the example inputs do not match the forward signature")
        with _EvalNoGrad(gm):
            ShapeProp(gm).propagate(*values)
    except Exception as e:
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
            node.meta.pop("type", None)
        if strict:
            raise ValueError(f"example_inputs do not run through {name or 'the model'}: {e}") from e
        logger.debug("shapes of %s unknown: %s", name or "the model", e)


def _capture(module: nn.Module, call: tuple[tuple, dict]) -> dict[int, tuple[tuple, dict]]:
    """The first call's arguments of every submodule when ``module`` runs on ``call``."""
    seen: dict[int, tuple[tuple, dict]] = {}

    def record(m, args, kwargs):
        seen.setdefault(id(m), (args, kwargs))

    handles = [
        m.register_forward_pre_hook(record, with_kwargs=True)
        for m in module.modules()
        if m is not module
    ]
    try:
        with _EvalNoGrad(module):
            module(*call[0], **call[1])
    except Exception as e:
        raise ValueError(f"example_inputs do not run through the model: {e}") from e
    finally:
        for h in handles:
            h.remove()
    return seen


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(e, _Untraceable):
        return first
    return f"{type(e).__name__}: {first}"[:300]


class _Pass:
    def __init__(self, call: tuple[tuple, dict] | None) -> None:
        self.call = call
        self.report = Report()
        self.captured: dict[int, tuple[tuple, dict]] | None = None
        self.done: dict[int, nn.Module] = {}

    def module(self, m: nn.Module, name: str, call: tuple[tuple, dict] | None) -> nn.Module:
        if id(m) in self.done:
            return self.done[id(m)]
        result = self._module(m, name, call)
        self.done[id(m)] = result
        return result

    def _module(self, m: nn.Module, name: str, call: tuple[tuple, dict] | None) -> nn.Module:
        if isinstance(m, torch.jit.ScriptModule):
            self.report.untraced.append(Untraced(name, "a TorchScript module is left as it is"))
            return m
        if isinstance(m, _CONTAINERS) or type(m).forward is nn.Module.forward:
            self._children(m, name)
            return m
        try:
            graph, constants = _trace(m)
        except Exception as e:
            logger.debug("not tracing %s whole: %s", name or "the model", e)
            self.report.untraced.append(Untraced(name, _reason(e)))
            if self.call is not None and self.captured is None:
                self.captured = _capture(m, call) if call is not None else {}
            self._children(m, name)
            return m
        if call is not None:
            # Shapes need a runnable module before the rewrite.
            gm = _graph_module(m, graph, constants)
            _propagate(gm, call, name, strict=call is self.call)
            sites = fuse_graph(gm, prefix=name)
            for node in gm.graph.nodes:  # shapes of these inputs only; not part of the result
                node.meta.pop("tensor_meta", None)
                node.meta.pop("type", None)
        else:
            matcher = _Matcher(graph, m, name)
            sites = matcher.run()
            gm = _graph_module(m, graph, constants) if matcher.changed else None
            if gm is not None:
                gm.graph.lint()
        self.report.sites.extend(sites)
        if any(s.fused and not s.already_fused for s in sites):
            return gm
        return m

    def _children(self, m: nn.Module, name: str) -> None:
        tracer = SkipTracer()
        for child_name, child in list(m._modules.items()):
            if child is None:
                continue
            if not isinstance(child, _CONTAINERS) and tracer.is_leaf_module(child, ""):
                continue
            call = self.captured.get(id(child)) if self.captured else None
            new = self.module(child, _join(name, child_name), call)
            if new is not child:
                m._modules[child_name] = new


def _run(model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, Report]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    copy = _clone(model, {})
    call = _as_call(example_inputs)
    p = _Pass(call)
    result = p.module(copy, "", call)
    return result, p.report


def optimize(
    model: nn.Module, example_inputs: ExampleInputs = None, *, return_report: bool = False
) -> nn.Module | tuple[nn.Module, Report]:
    """A copy of ``model`` with every eligible skip connection fused (see the module docstring).

    The result shares the input's Parameter and buffer objects and has the same ``state_dict``
    keys; a module that was rewritten becomes a ``torch.fx.GraphModule`` of the same class name
    holding the same submodules. ``example_inputs`` (a tensor, a tuple of positional arguments
    or a dict of keyword arguments) lets the pass check shapes before fusing; it runs the model
    once in eval mode without autograd. With ``return_report`` returns ``(module, report)``.
    """
    result, report = _run(model, example_inputs)
    return (result, report) if return_report else result


def explain(
    model: nn.Module, example_inputs: ExampleInputs = None, *, dynamo: bool = False
) -> Report:
    """The :class:`~tritskip.report.Report` of what :func:`optimize` would do; changes nothing.

    With ``dynamo`` it reports instead what ``torch.compile(model, backend="tritskip")`` fuses:
    TorchDynamo captures the model on ``example_inputs`` (required; the model runs once, in its
    current mode, without autograd) and the matcher runs on each captured graph. This reaches
    models that ``torch.fx`` cannot trace (``**kwargs``, tuple unpacking, data-dependent
    branches, as in the transformers library). Like ``torch._dynamo.explain``, it resets
    Dynamo's compile caches before and after.
    """
    if not dynamo:
        return _run(model, example_inputs)[1]
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    call = _as_call(example_inputs)
    if call is None:
        raise ValueError("explain(..., dynamo=True) needs example_inputs to run the model on")
    try:
        with torch.no_grad():
            captured = torch._dynamo.explain(model)(*call[0], **call[1])
    except Exception as e:
        raise ValueError(f"example_inputs do not run through the model: {e}") from e
    report = Report()
    for gm in captured.graphs:
        report.sites.extend(fuse_graph(gm))  # Dynamo's own copies; the model is not touched
    for br in captured.break_reasons:
        frame = br.user_stack[-1] if br.user_stack else None
        where = f"{frame.filename}:{frame.lineno}: " if frame is not None else ""
        report.graph_breaks.append(f"{where}{str(br.reason).strip().splitlines()[0]}")
    return report
