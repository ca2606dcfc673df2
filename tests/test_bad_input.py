"""Bad input at run time: the fused paths fail the way eager PyTorch fails, or more clearly.

For each bad input (a residual or shortcut of the wrong shape, mixed dtypes, tensors on two
devices, with ``meta`` as the second device, a wrong input width), the fused functions, the
blocks and an optimized model raise the exception type eager raises for the same computation,
or return what eager returns where eager accepts the input (type promotion). Where eager itself
is silently wrong (``F.linear`` of a CPU input with a ``meta`` weight returns uninitialized
memory), they raise a ``RuntimeError`` naming the devices. NaN and Inf propagate exactly as in
eager, through the outputs and every gradient, on the PyTorch path and on the Triton kernels;
an empty batch gives an empty result and zero parameter gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritskip import (
    ACTIVATIONS,
    ConcatSkip,
    DenseChain,
    Residual,
    SkipConnection,
    fused_linear,
    fused_linear_cat,
)
from tritskip.dense_chain import eager_dense_chain
from tritskip.functional import eager_linear_cat, eager_linear_epilogue
from tritskip.graph_pass import optimize
from tritskip.ops import force_backend

M, K, N = 3, 4, 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["composite", "torch"])
def path(request):
    """Both CPU paths: the in-place composition eager calls take, and the op's PyTorch path."""
    with force_backend(request.param):
        yield request.param


def outcome(fn):
    try:
        return fn()
    except Exception as e:
        return e


def assert_like_eager(eager, fused, what: str) -> None:
    """Same exception type as eager, or the same result where eager returns one."""
    e, f = outcome(eager), outcome(fused)
    if isinstance(e, Exception):
        assert type(f) is type(e), f"{what}: eager raised {e!r}, fused gave {f!r}"
        return
    assert not isinstance(f, Exception), f"{what}: eager returned, fused raised {f!r}"
    assert (f.dtype, f.shape, f.device) == (e.dtype, e.shape, e.device), what
    # The matmuls run in float32; where the result is promoted, eager rounds the Linear's output
    # to float32 first and the fused path does not (DESIGN.md), so float32 tolerances apply.
    torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5, msg=f"{what}: values differ")


class ResidualNet(nn.Module):
    """``relu(fc(x) + r)``, optimized into one fused call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(K, N)

    def forward(self, x, r):
        return F.relu(self.fc(x) + r)


def eager_residual_net(model: ResidualNet, x, r):
    return F.relu(F.linear(x, model.fc.weight, model.fc.bias) + r)


def x_(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# name -> (x, residual) for the Linear K -> N with float32 CPU weights
RESIDUAL_CASES = {
    "residual of the wrong width": (x_(M, K), x_(M, N + 1)),
    "residual of the wrong batch": (x_(M, K), x_(M + 1, N)),
    "residual of another rank": (x_(2, M, K), x_(M, 2, N)),
    "broadcasting residual": (x_(2, M, K), x_(N)),
    "wrong input width": (x_(M, K + 1), x_(M, N)),
    "float64 input": (x_(M, K, dtype=torch.float64), x_(M, N)),
    "integer input": (torch.ones(M, K, dtype=torch.long), x_(M, N)),
    "float64 residual (promotes)": (x_(M, K), x_(M, N, dtype=torch.float64)),
    "float16 residual (promotes)": (x_(M, K), x_(M, N, dtype=torch.float16)),
    "input on meta": (x_(M, K, device="meta"), x_(M, N)),
    "residual on meta": (x_(M, K), x_(M, N, device="meta")),
    "1-D input": (x_(K), x_(N)),
}


@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_fused_linear_fails_like_eager(case, path):
    x, r = RESIDUAL_CASES[case]
    w, b = torch.randn(N, K), torch.randn(N)
    assert_like_eager(
        lambda: eager_linear_epilogue(x, w, b, residual=r, activation="relu"),
        lambda: fused_linear(x, w, b, residual=r, activation="relu"),
        case,
    )


@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_optimized_model_fails_like_eager(case, path):
    x, r = RESIDUAL_CASES[case]
    model = ResidualNet()
    optimized = optimize(model)
    assert_like_eager(
        lambda: eager_residual_net(model, x, r), lambda: optimized(x, r), f"optimized: {case}"
    )


SHORTCUT_CASES = {
    "shortcut of the wrong batch": (x_(M, K), x_(M + 1, 2)),
    "shortcut of another rank": (x_(M, K), x_(1, M, 2)),
    "float64 shortcut (promotes)": (x_(M, K), x_(M, 2, dtype=torch.float64)),
    "shortcut on meta": (x_(M, K), x_(M, 2, device="meta")),
    "wrong input width": (x_(M, K + 2), x_(M, 2)),
}


@pytest.mark.parametrize("case", SHORTCUT_CASES)
def test_fused_linear_cat_fails_like_eager(case, path):
    x, s = SHORTCUT_CASES[case]
    w, b = torch.randn(N, K), torch.randn(N)
    assert_like_eager(
        lambda: eager_linear_cat(x, w, b, shortcut=s, layer_activation="gelu"),
        lambda: fused_linear_cat(x, w, b, shortcut=s, layer_activation="gelu"),
        case,
    )


# name -> (block factory, its eager computation, input)
def _residual():
    return Residual(nn.Linear(K, K), activation="relu")


def _projected():
    return Residual(nn.Linear(K, N), activation="tanh", shortcut=nn.Linear(K, N - 1))


def _concat():
    return ConcatSkip(nn.Linear(K, N), activation="silu")


def _skip_add():
    return SkipConnection(nn.Linear(K, K), "add")


def _dense():
    return DenseChain(K, 2, num_layers=2)


def _eager_block(block, x):
    if isinstance(block, DenseChain):
        weights = [layer.weight for layer in block.layers]
        biases = [layer.bias for layer in block.layers]
        return eager_dense_chain(x, weights, biases, block.activation)
    if isinstance(block, ConcatSkip):
        return torch.cat([F.silu(block.layer(x)), x], -1)
    if isinstance(block, SkipConnection):
        return block.layer(x) + x
    projected = isinstance(block.shortcut, nn.Linear)
    act = torch.tanh if projected else torch.relu
    return act(block.layer(x) + block.shortcut(x))


BLOCKS = {
    "Residual": _residual,
    "Residual with a shortcut of the wrong width": _projected,
    "ConcatSkip": _concat,
    "SkipConnection": _skip_add,
    "DenseChain": _dense,
}
BLOCK_INPUTS = {
    "wrong input width": lambda: x_(M, K + 1),
    "float64 input": lambda: x_(M, K, dtype=torch.float64),
    "input on meta": lambda: x_(M, K, device="meta"),
    "good input": lambda: x_(2, M, K),
}


@pytest.mark.parametrize("inputs", BLOCK_INPUTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_block_fails_like_eager(block, inputs, path):
    module = BLOCKS[block]()
    x = BLOCK_INPUTS[inputs]()
    assert_like_eager(lambda: _eager_block(module, x), lambda: module(x), f"{block}, {inputs}")


def test_meta_weight_with_cpu_input_raises_instead_of_returning_garbage(path):
    x, w, b = x_(M, K), torch.randn(N, K, device="meta"), torch.randn(N)
    assert isinstance(outcome(lambda: F.linear(x, w, b)), torch.Tensor), (
        "eager F.linear raises here now; this test can assert the same error type instead"
    )
    for fn in (
        lambda: fused_linear(x, w, b, residual=x_(M, N)),
        lambda: fused_linear_cat(x, w, b, shortcut=x),
    ):
        with pytest.raises(RuntimeError, match="weight on meta"):
            fn()
    model = ResidualNet()
    model.fc.weight = nn.Parameter(torch.randn(N, K, device="meta"))
    with pytest.raises(RuntimeError, match="weight on meta"):
        optimize(model)(x, x_(M, N))
    block = _residual()
    block.layer.weight = nn.Parameter(torch.randn(K, K, device="meta"))
    with pytest.raises(RuntimeError, match="weight on meta"):
        block(x_(M, K))
    chain = _dense().to("meta")
    with pytest.raises(RuntimeError, match="weight is on meta"):
        chain(x_(M, K))


@pytest.mark.parametrize("block", BLOCKS)
def test_blocks_run_on_meta(block, path):
    module = BLOCKS[block]().to("meta")
    x = x_(2, M, K, device="meta")
    if block == "Residual with a shortcut of the wrong width":
        with pytest.raises(RuntimeError):
            module(x)
        return
    y = module(x)
    assert y.device.type == "meta" and y.shape == _eager_block(module, x).shape


# --------------------------------------------------------------------------------------------
# The result changed in place before the backward


def _changed_in_place(fn):
    try:
        h = fn()
        h.mul_(2)
        h.sum().backward()
    except RuntimeError as e:
        return type(e)
    return None


@pytest.mark.parametrize("outer", ["identity", "relu", "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("inner", ["identity", "relu", "leaky_relu", "gelu"])
def test_result_changed_in_place_where_eager_allows_it(inner, outer, path):
    """Whatever the fused calls save for the backward, an in-place change to their result that
    eager's backward tolerates must be tolerated too (leaky_relu saves its input in eager; a
    concatenation's activation never saved the concatenation)."""
    fc = nn.Linear(K, K)
    x = torch.randn(M, K)
    for residual in (None, x):
        kw = {"residual": residual, "activation": outer, "layer_activation": inner}
        eager = _changed_in_place(lambda kw=kw: eager_linear_epilogue(x, *fc.parameters(), **kw))
        fused = _changed_in_place(lambda kw=kw: fused_linear(x, *fc.parameters(), **kw))
        assert eager is not None or fused is None, f"fused_linear {kw} raised where eager did not"
    kw = {"shortcut": x, "layer_activation": inner}
    eager = _changed_in_place(lambda: eager_linear_cat(x, fc.weight, fc.bias, **kw))
    fused = _changed_in_place(lambda: fused_linear_cat(x, fc.weight, fc.bias, **kw))
    assert eager is not None or fused is None, (
        f"fused_linear_cat {inner} raised where eager did not"
    )


# --------------------------------------------------------------------------------------------
# Non-finite values


def _with_specials(shape, dtype) -> torch.Tensor:
    t = torch.randn(shape, dtype=dtype)
    flat = t.view(-1)
    flat[0], flat[3], flat[-1] = float("nan"), float("inf"), float("-inf")
    return t


def _assert_same_specials(got, want, what: str) -> None:
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(got), test(want)), f"{what}: {test.__name__} positions differ"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4, msg=what)


def _run_all(fn, tensors):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*ts)
    grad = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in ts]


def _check_specials(where: str, inner: str, outer: str) -> None:
    dtype = torch.float32
    x, w, b = torch.randn(M, K), torch.randn(N, K) / 2, torch.randn(N)
    r, g = torch.randn(M, N), torch.rand(N) + 0.5
    if where == "x":
        x = _with_specials((M, K), dtype)
    elif where == "weight":
        w = _with_specials((N, K), dtype)
    else:
        r = _with_specials((M, N), dtype)
    kwargs = {"activation": outer, "layer_activation": inner}
    want = _run_all(lambda *t: eager_linear_epilogue(*t[:3], residual=t[3], gamma=t[4], **kwargs),
                    (x, w, b, r, g))  # fmt: skip
    got = _run_all(lambda *t: fused_linear(*t[:3], residual=t[3], gamma=t[4], **kwargs),
                   (x, w, b, r, g))  # fmt: skip
    for name, a, e in zip(
        ("output", "dx", "dW", "db", "dresidual", "dgamma"), got, want, strict=True
    ):
        _assert_same_specials(a, e, f"NaN/Inf in {where}, {inner} → {outer}: {name}")


@pytest.mark.parametrize("outer", ACTIVATIONS)
@pytest.mark.parametrize("inner", ["identity", "relu", "gelu", "tanh"])
@pytest.mark.parametrize("where", ["x", "weight", "residual"])
def test_nan_and_inf_propagate_as_in_eager(where, inner, outer, path):
    _check_specials(where, inner, outer)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy on NaN
@pytest.mark.parametrize("outer", ["identity", "relu", "leaky_relu", "gelu", "sigmoid"])
@pytest.mark.parametrize("inner", ["identity", "relu", "silu"])
@pytest.mark.parametrize("where", ["x", "residual"])
def test_nan_and_inf_propagate_as_in_eager_on_the_kernels(where, inner, outer):
    _check_specials(where, inner, outer)


def test_nan_and_inf_through_an_optimized_model(path):
    model = ResidualNet()
    optimized = optimize(model)
    x, r = _with_specials((2, M, K), torch.float32), _with_specials((2, M, N), torch.float32)
    want = _run_all(lambda a, c: eager_residual_net(model, a, c), (x, r))
    got = _run_all(optimized, (x, r))
    for name, a, e in zip(("output", "dx", "dresidual"), got, want, strict=True):
        _assert_same_specials(a, e, f"optimized model: {name}")


# --------------------------------------------------------------------------------------------
# Empty batches


def _check_empty(lead) -> None:
    x = torch.randn(*lead, K)
    cases = {
        "fused_linear": (
            lambda *t: fused_linear(*t, residual=torch.zeros(*lead, N), activation="gelu"),
            lambda *t: eager_linear_epilogue(*t, residual=torch.zeros(*lead, N), activation="gelu"),
        ),
        "fused_linear_cat": (
            lambda *t: fused_linear_cat(*t, shortcut=torch.zeros(*lead, 2), layer_activation="relu"),
            lambda *t: eager_linear_cat(*t, shortcut=torch.zeros(*lead, 2), layer_activation="relu"),
        ),
    }  # fmt: skip
    w, b = torch.randn(N, K), torch.randn(N)
    for name, (fused, eager) in cases.items():
        got, want = _run_all(fused, (x, w, b)), _run_all(eager, (x, w, b))
        for k, (a, e) in enumerate(zip(got, want, strict=True)):
            assert a.shape == e.shape, f"{name} {lead}: tensor {k} has shape {a.shape}"
            assert torch.equal(a, e), f"{name} {lead}: tensor {k} differs"
    for block in BLOCKS.values():
        module = block()
        if isinstance(module, Residual) and module.shortcut is not None:
            continue
        y = module(x.clone().requires_grad_())
        y.sum().backward()
        assert y.shape == _eager_block(module, x).shape, f"{type(module).__name__} {lead}"
        for pname, p in module.named_parameters():
            assert p.grad is not None and not p.grad.any(), f"{pname} of {type(module).__name__}"


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batch(lead, path):
    _check_empty(lead)


@pytest.mark.triton
@pytest.mark.parametrize("lead", [(0,), (0, 3)])
def test_empty_batch_on_the_kernels(lead):
    _check_empty(lead)
