"""The eager CPU path: in-place epilogue steps that autograd can still differentiate.

Compared with the float64 eager composition, outputs and every gradient, for every activation
in both slots, every gamma form and a residual that widens the dtype.
"""

import pytest
import torch

from tritskip import ACTIVATIONS, fused_linear, fused_linear_cat
from tritskip.functional import eager_linear_cat, eager_linear_epilogue
from tritskip.ops import force_backend

pytestmark = pytest.mark.usefixtures("composite")


@pytest.fixture
def composite():
    with force_backend("composite"):
        yield


def _leaves(dtype=torch.float64, residual_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 7, 9, generator=g, dtype=dtype).requires_grad_(),
        "weight": torch.randn(5, 9, generator=g, dtype=dtype).requires_grad_(),
        "bias": torch.randn(5, generator=g, dtype=dtype).requires_grad_(),
        "residual": torch.randn(
            2, 7, 5, generator=g, dtype=residual_dtype or dtype
        ).requires_grad_(),
        "gamma": torch.randn(5, generator=g, dtype=dtype).requires_grad_(),
    }


def _run(fn, leaves, kwargs, with_grad):
    if not with_grad:
        with torch.no_grad():
            return fn(**leaves, **kwargs), None
    out = fn(**leaves, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), list(leaves.values()))
    return out, dict(zip(leaves, grads, strict=True))


GAMMAS = ["none", "float", "vector", "vector_no_grad"]


@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("inner", ACTIVATIONS)
@pytest.mark.parametrize("outer", ["identity", "relu", "gelu", "sigmoid"])
def test_matches_eager(outer, inner, gamma, with_grad):
    leaves = _leaves()
    gamma_leaf = leaves.pop("gamma")
    kwargs = {"activation": outer, "layer_activation": inner, "alpha": 0.75}
    if gamma == "float":
        kwargs["gamma"] = -0.5
    elif gamma == "vector_no_grad":
        kwargs["gamma"] = gamma_leaf.detach()
    elif gamma == "vector":
        leaves["gamma"] = gamma_leaf
    out, grads = _run(fused_linear, leaves, kwargs, with_grad)
    twins = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    ref, ref_grads = _run(eager_linear_epilogue, twins, kwargs, with_grad)
    torch.testing.assert_close(out, ref, msg=f"output of {outer}({inner}), gamma {gamma}")
    for name in grads or {}:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=f"grad of {name}")


def test_wider_residual_allocates_like_eager():
    leaves = _leaves(dtype=torch.float32, residual_dtype=torch.float64)
    del leaves["gamma"]
    out, grads = _run(fused_linear, leaves, {"activation": "relu"}, True)
    twins = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    ref, ref_grads = _run(eager_linear_epilogue, twins, {"activation": "relu"}, True)
    assert out.dtype == ref.dtype == torch.float64
    for name in grads:
        assert grads[name].dtype == leaves[name].dtype
        torch.testing.assert_close(grads[name], ref_grads[name])


@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("shortcut_first", [False, True])
def test_concat(shortcut_first, with_grad):
    leaves = _leaves()
    leaves["shortcut"] = leaves.pop("residual")[..., :3].detach().requires_grad_()
    kwargs = {"layer_activation": "relu", "shortcut_first": shortcut_first}
    gamma = leaves.pop("gamma")
    out, grads = _run(lambda **kw: fused_linear_cat(**kw, gamma=gamma), leaves, kwargs, with_grad)
    twins = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    ref, ref_grads = _run(
        lambda **kw: eager_linear_cat(**kw, gamma=gamma), twins, kwargs, with_grad
    )
    assert out.is_contiguous() and out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    for name in grads or {}:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=f"grad of {name}")


def test_in_place_on_the_result_is_allowed():
    """Users may modify a Linear's output in place in eager; the fused result allows it too."""
    leaves = _leaves()
    y = fused_linear(leaves["x"], leaves["weight"], leaves["bias"], residual=leaves["residual"])
    y.mul_(2)
    y.sum().backward()
    torch.testing.assert_close(leaves["residual"].grad, torch.full_like(leaves["residual"], 2.0))
