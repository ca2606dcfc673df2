"""The graph pass's dense-chain rule: ``h = cat([act(linear(h)), h], -1)`` repeated, in one buffer.

A *dense step* is a ``torch.cat`` of two tensors along the last dimension, ``[y, h]``, where
``y`` is ``act(linear(h))`` (or ``linear(h)``) of the very ``h`` it is concatenated with, the
Linear's output feeds only the activation and the activation's output only the cat. Two steps
are *linked* when the first step's result feeds exactly the second step's Linear and cat, and
nothing else, and both use the same activation. A run of two or more linked steps is rewritten
into one call of :func:`tritskip.dense_chain.dense_chain`, whose weights and biases are
``get_attr`` nodes of the original parameters (``state_dict`` keys are unchanged).

What it keeps from eager:

- **Escaping intermediates.** A concatenation used anywhere else (returned, fed to another
  op, kept in a list) ends the chain there: the next chain starts from it as its input, and a
  lone step is left to the single-site rule (``fused_linear_cat``). No value the model can see
  is replaced by a view of a shared buffer.
- **In-place ops.** The chain's call runs where its last cat was; a chain is not rewritten when
  an in-place op outside it runs between its first Linear and its last cat (it could change
  the input the call reads late). The Linear's own in-place activation (``ReLU(inplace=True)``)
  is part of the step.
- **Shapes.** As for single sites: a ``cat`` along ``dim >= 0`` counts as the last dimension
  only when recorded shapes show it is, and recorded dtypes must agree; without shapes,
  :func:`~tritskip.dense_chain.dense_chain` checks at every call and runs the eager chain where
  the one-buffer form would differ.
- **Order.** Only newest-first concatenations (``cat([y, h])``) form chains.
- **The result is saved for the backward.** The one-buffer backward reads the final buffer, so
  autograd would reject an in-place change of it that eager allows (eager's last ``cat`` saves
  nothing). A chain whose last concatenation is changed in place, directly or through a view
  taken from it (``h.mul_(2)``, ``h[..., 0] = 0``, ``h.view(...).add_(1)``), ends one step
  earlier; the step left over is fused on its own.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from .dense_chain import dense_chain
from .epilogue import Activation
from .report import Site

if TYPE_CHECKING:
    from .graph_pass import _Linear, _Matcher

__all__ = ["dense_chain_sites", "rewrite_dense_chains"]


@dataclass(frozen=True)
class _Step:
    lin: _Linear
    act: Activation
    act_node: Node | None
    cat: Node

    @property
    def nodes(self) -> tuple[Node, ...]:
        inner = () if self.act_node is None else (self.act_node,)
        return (self.lin.node, *inner, self.cat)


def _step(matcher: _Matcher, cat: Node) -> _Step | None:
    """The dense step ending in ``cat``, or ``None``."""
    spec = matcher._cat(cat)
    if spec is None:
        return None
    parts, dim = spec
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    y, h = parts
    if not isinstance(y, Node) or not isinstance(h, Node) or y is h:
        return None
    lin_node, act, act_node = y, Activation(), None
    applied = matcher._activation(y)
    if applied is not None:
        lin_node, act = applied
        act_node = y
        if not isinstance(lin_node, Node) or list(lin_node.users) != [y]:
            return None
    if list(y.users) != [cat]:
        return None
    lin = matcher._linear(lin_node)
    if lin is None or lin.ineligible or lin.transposed or lin.x is not h:
        return None
    if matcher._last_dim(lin, dim) or matcher._same_tensor(lin, h, "shortcut"):
        return None
    return _Step(lin, act, act_node, cat)


def _chains(matcher: _Matcher) -> list[list[_Step]]:
    """Maximal runs of linked steps, in graph order, each at least two long."""
    steps = {}
    for node in matcher.graph.nodes:
        step = _step(matcher, node)
        if step is not None:
            steps[node] = step
    following: dict[Node, _Step] = {}
    for step in steps.values():
        before = steps.get(step.lin.x)
        if (
            before is not None
            and set(before.cat.users) == {step.lin.node, step.cat}
            and before.act == step.act
        ):
            following[before.cat] = step
    linked = {id(step) for step in following.values()}
    chains = []
    for step in steps.values():
        if id(step) in linked:
            continue
        chain = [step]
        while chain[-1].cat in following:
            chain.append(following[chain[-1].cat])
        if len(chain) >= 2:
            chains.append(chain)
    return chains


# Methods and functions whose result shares memory with their first argument.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "narrow", "select", "transpose", "t", "permute",
    "unsqueeze", "squeeze", "flatten", "unflatten", "expand", "expand_as", "chunk", "split",
    "unbind", "movedim", "swapaxes", "diagonal", "as_strided", "detach", "contiguous",
}  # fmt: skip
_VIEW_FUNCTIONS = {
    operator.getitem, torch.narrow, torch.select, torch.transpose, torch.t, torch.permute,
    torch.unsqueeze, torch.squeeze, torch.flatten, torch.reshape, torch.chunk, torch.split,
    torch.unbind, torch.movedim, torch.swapaxes, torch.diagonal, torch.as_strided, torch.detach,
}  # fmt: skip


def _mutated(matcher: _Matcher, node: Node, depth: int = 0) -> bool:
    """Whether an in-place op changes ``node``'s value, directly or through views of it."""
    for user in node.users:
        first = user.args[0] if user.args else None
        if matcher._is_inplace(user) and first is node:
            return True
        is_view = (user.op == "call_method" and user.target in _VIEW_METHODS) or (
            user.op == "call_function" and _hashable(user.target) and user.target in _VIEW_FUNCTIONS
        )
        if is_view and first is node and depth < 8 and _mutated(matcher, user, depth + 1):
            return True
    return False


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _hazard(matcher: _Matcher, chain: list[_Step]) -> bool:
    """Whether an in-place op outside the chain runs between its first Linear and last cat."""
    lo, hi = matcher.index[chain[0].lin.node], matcher.index[chain[-1].cat]
    own = {node for step in chain for node in step.nodes}
    return any(
        lo < i < hi and matcher._is_inplace(node)
        for node, i in matcher.index.items()
        if node not in own
    )


def rewrite_dense_chains(matcher: _Matcher) -> dict[Node, list[Site]]:
    """Rewrite every dense chain of ``matcher``'s graph into one ``dense_chain`` call.

    Returns the new call nodes, each with one fused :class:`~tritskip.report.Site` per layer.
    Expects ``matcher.index`` to number the graph's nodes in order.
    """
    from .graph_pass import _meta, _source

    rewritten: dict[Node, list[Site]] = {}
    for chain in _chains(matcher):
        while len(chain) >= 2 and _mutated(matcher, chain[-1].cat):
            chain = chain[:-1]
        if len(chain) < 2 or _hazard(matcher, chain):
            continue
        call = _rewrite(matcher, chain)
        sites = []
        for i, step in enumerate(chain, 1):
            m = _meta(step.cat)
            pattern = [step.lin.label, *([] if step.act_node is None else [str(step.act)]), "cat"]
            sites.append(
                Site(
                    module=step.lin.name,
                    source=_source(step.lin.node),
                    pattern=" → ".join(pattern),
                    fused=True,
                    note=f"layer {i} of a {len(chain)}-layer dense chain written into one buffer",
                    shape=m[0] if m else None,
                )
            )
        rewritten[call] = sites
    return rewritten


def _rewrite(matcher: _Matcher, chain: list[_Step]) -> Node:
    graph, end = matcher.graph, chain[-1].cat
    # Read the Linears again: an earlier rewrite may have replaced this chain's input.
    lins = [matcher._linear(step.lin.node) for step in chain]
    with graph.inserting_before(end):
        weights, biases = [], []
        for lin in lins:
            if lin.module is not None:
                weights.append(graph.get_attr(f"{lin.node.target}.weight"))
                has_bias = lin.module.bias is not None
                biases.append(graph.get_attr(f"{lin.node.target}.bias") if has_bias else None)
            else:
                weights.append(lin.weight)
                biases.append(lin.bias)
        act = matcher._activation_arg(chain[0].act)
        call = graph.call_function(dense_chain, (lins[0].x, weights, biases, act))
    call.meta.update({k: v for k, v in end.meta.items() if k != "stack_trace"})
    for key in ("stack_trace", "nn_module_stack"):
        if key in chain[0].lin.node.meta:
            call.meta[key] = chain[0].lin.node.meta[key]
    call.meta["is_wrapped"] = True  # the generated code marks the call as a tracing leaf
    end.replace_all_uses_with(call)
    for step in reversed(chain):
        for node in reversed(step.nodes):
            graph.erase_node(node)
    matcher.changed = True
    return call


def dense_chain_sites(matcher: _Matcher, node: Node) -> list[Site]:
    """One already-fused site per layer of a ``dense_chain`` call found in a graph."""
    from .graph_pass import _join, _meta, _source

    weights = node.args[1] if len(node.args) > 1 else node.kwargs.get("weights")
    m = _meta(node)
    sites = []
    for w in weights if isinstance(weights, (list, tuple)) else [None]:
        name = matcher._owner(node)
        if isinstance(w, Node) and w.op == "get_attr" and w.target.endswith(".weight"):
            name = _join(matcher.prefix, w.target.rpartition(".")[0])
        sites.append(
            Site(
                module=name,
                source=_source(node),
                pattern="dense_chain",
                fused=True,
                shape=m[0] if m else None,
                already_fused=True,
            )
        )
    return sites
