"""DenseChain and dense_chain against the eager chain ``h = cat([act(fc(h)), h], -1)``.

float64 checks compare values and every gradient (input, each weight, each bias) with eager
float64. Lower precisions follow DESIGN.md: error against the float64 eager chain at most twice
eager's own error in that dtype, plus a small atol. Freshly allocated memory is filled with NaN
(``fill_uninitialized_memory``), so a column the chain forgets to write fails.
"""

import pytest
import torch
from torch import nn

from tritskip.dense_chain import DenseChain, dense_chain, eager_dense_chain

ACTS = ["relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "identity"]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison_empty():
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def _params(k0, widths, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights, biases, width = [], [], k0
    for n in widths:
        w = torch.randn(n, width, generator=g) * width**-0.5
        weights.append(w.to(dtype).requires_grad_())
        biases.append(torch.randn(n, generator=g).to(dtype).requires_grad_() if bias else None)
        width += n
    return weights, biases


def _input(shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, wanted, grad_out)


def _names(num_layers, bias=True):
    names = ["x"] + [f"weight{i}" for i in range(num_layers)]
    return names + ([f"bias{i}" for i in range(num_layers)] if bias else [])


def _assert_close(actual, expected, what, atol=1e-12, rtol=1e-10):
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(
    "shape, widths",
    [((17, 33), [5, 5, 5]), ((3, 1), [1, 7]), ((2, 5, 9), [3, 8, 1, 4]), ((9,), [4, 4])],
    ids=["2d", "width1", "3d_uneven", "1d"],
)
def test_values_and_every_gradient_float64(act, shape, widths):
    weights, biases = _params(shape[-1], widths)
    x = _input(shape)
    out = dense_chain(x, weights, biases, act)
    ref = eager_dense_chain(x, weights, biases, act)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.is_contiguous() == ref.is_contiguous()
    _assert_close(out, ref, f"{act} output")
    grad_out = torch.randn_like(ref)
    got = _grads(out, [x, *weights, *biases], grad_out)
    want = _grads(ref, [x, *weights, *biases], grad_out)
    for name, a, b in zip(_names(len(widths)), got, want, strict=True):
        _assert_close(a, b, f"{act} grad of {name}")


def test_without_bias_and_partial_requires_grad():
    weights, _ = _params(6, [3, 5, 2], bias=False)
    weights[1].requires_grad_(False)
    x = _input((11, 6)).detach()  # the input needs no gradient
    out = dense_chain(x, weights, None, "relu")
    ref = eager_dense_chain(x, weights, None, "relu")
    _assert_close(out, ref, "output")
    trainable = [weights[0], weights[2]]
    grad_out = torch.randn_like(ref)
    got, want = _grads(out, trainable, grad_out), _grads(ref, trainable, grad_out)
    for a, b in zip(got, want, strict=True):
        _assert_close(a, b, "weight grad")


def test_expanded_grad_out_and_grad_only_for_input():
    weights, biases = _params(4, [3, 3])
    frozen = [w.detach() for w in weights], [b.detach() for b in biases]
    x = _input((2, 3, 4))
    (dx,) = torch.autograd.grad(dense_chain(x, *frozen, "gelu").sum(), x)
    (ref,) = torch.autograd.grad(eager_dense_chain(x, *frozen, "gelu").sum(), x)
    _assert_close(dx, ref, "input grad")
    assert dx.shape == x.shape and dx.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_low_precision_against_float64(dtype, act):
    weights, biases = _params(33, [17, 17, 17])
    x = _input((65, 33))
    ref = eager_dense_chain(x, weights, biases, act)
    cast = [t.detach().to(dtype).requires_grad_() for t in (x, *weights, *biases)]
    xl, wl, bl = cast[0], cast[1:4], cast[4:]
    out = dense_chain(xl, wl, bl, act)
    eager = eager_dense_chain(xl, wl, bl, act)
    assert out.dtype == dtype
    grad_out = torch.randn_like(ref)
    got = _grads(out, cast, grad_out.to(dtype))
    eag = _grads(eager, cast, grad_out.to(dtype))
    want = _grads(ref, [x, *weights, *biases], grad_out)
    pairs = zip(["output", *_names(3)], [out, *got], [eager, *eag], [ref, *want], strict=True)
    for name, a, e, r in pairs:
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        bound = 2 * eager_err + ATOL[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} exceeds 2x eager's {eager_err:.3g}"


def test_repeated_calls_do_not_touch_earlier_results():
    chain = DenseChain(8, 4, 3, "relu", dtype=torch.float64)
    x1, x2 = _input((5, 8), seed=1), _input((5, 8), seed=2)
    out1 = chain(x1)
    kept = out1.detach().clone()
    out2 = chain(x2)
    assert torch.equal(out1, kept), "the second call changed the first call's output"
    assert out1.untyped_storage().data_ptr() != out2.untyped_storage().data_ptr()
    out1.sum().backward()  # the first graph is intact after the second call
    ref = eager_dense_chain(x1, [m.weight for m in chain.layers], [m.bias for m in chain.layers])
    _assert_close(out1, ref, "first output")


def test_in_place_change_of_output_is_caught():
    weights, biases = _params(4, [2, 2])
    out = dense_chain(_input((3, 4)), weights, biases, "relu")
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_no_grad_and_zero_rows():
    weights, biases = _params(5, [3, 2])
    x = _input((0, 5))
    with torch.no_grad():
        out = dense_chain(x, weights, biases)
    assert out.shape == (0, 10) and not out.requires_grad
    out = dense_chain(x, weights, biases)
    out.sum().backward()
    assert weights[0].grad.shape == weights[0].shape


def test_falls_back_to_eager_for_mixed_dtypes_and_bad_widths():
    weights, biases = _params(4, [3, 3])
    x32 = _input((2, 4), dtype=torch.float32)
    with pytest.raises(RuntimeError):
        eager_dense_chain(x32, weights, biases)
    with pytest.raises(RuntimeError):
        dense_chain(x32, weights, biases)
    with pytest.raises(RuntimeError):
        dense_chain(_input((2, 5)), weights, biases)
    with pytest.raises(ValueError, match="2 weights but 1 biases"):
        dense_chain(_input((2, 4)), weights, biases[:1])
    x = _input((2, 4))
    assert dense_chain(x, [], None) is x


def test_module_from_widths():
    chain = DenseChain(6, 4, 3, activation=nn.GELU(approximate="tanh"), dtype=torch.float64)
    assert [m.in_features for m in chain.layers] == [6, 10, 14]
    assert (chain.in_features, chain.out_features, chain.num_layers) == (6, 18, 3)
    assert str(chain.activation) == "gelu_tanh"
    assert "out_features=18" in repr(chain) and "activation=gelu_tanh" in repr(chain)
    assert list(chain.state_dict()) == [
        f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")
    ]
    x = _input((2, 3, 6))
    ref = eager_dense_chain(
        x, [m.weight for m in chain.layers], [m.bias for m in chain.layers], "gelu_tanh"
    )
    _assert_close(chain(x), ref, "output")


def test_module_from_layers_shares_parameters():
    layers = [nn.Linear(5, 2), nn.Linear(7, 6, bias=False), nn.Linear(13, 1)]
    chain = DenseChain.from_layers(layers, activation="tanh").double()
    assert all(a is b for a, b in zip(chain.layers, layers, strict=True))
    x = _input((4, 5))
    out = chain(x)
    ref = x
    for layer in layers:
        ref = torch.cat([torch.tanh(layer(ref)), ref], -1)
    _assert_close(out, ref, "output")
    assert out.shape == (4, 14)


def test_module_rejects_bad_layers():
    with pytest.raises(ValueError, match="layer 1 takes 6 features but the chain has 7"):
        DenseChain.from_layers([nn.Linear(5, 2), nn.Linear(6, 2)])
    with pytest.raises(TypeError, match=r"must be an nn\.Linear"):
        DenseChain.from_layers([nn.Linear(5, 2), nn.Conv1d(7, 2, 1)])
    with pytest.raises(ValueError, match="at least one layer"):
        DenseChain.from_layers([])
    with pytest.raises(ValueError, match="num_layers"):
        DenseChain(4, 4, 0)
    with pytest.raises(ValueError, match="unknown activation"):
        DenseChain(4, 4, 2, activation="swish")


def test_hooks_on_layers_still_run():
    chain = DenseChain(4, 3, 2, "relu", dtype=torch.float64)
    seen = []
    chain.layers[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = _input((2, 4))
    ref = eager_dense_chain(x, [m.weight for m in chain.layers], [m.bias for m in chain.layers])
    _assert_close(chain(x), ref, "output")
    assert seen == [torch.Size([2, 3])]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("shape", [(17, 5), (2, 3, 9)], ids=["2d", "3d"])
def test_triton_forward(shape, act, dtype):
    widths = [3, 17, 1]
    weights, biases = _params(shape[-1], widths)
    x = _input(shape)
    ref = eager_dense_chain(x, weights, biases, act)
    low = [t.detach().to(dtype).requires_grad_() for t in (x, *weights, *biases)]
    xl, wl, bl = low[0], low[1:4], low[4:]
    out = dense_chain(xl, wl, bl, act)
    eager = eager_dense_chain(xl, wl, bl, act)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    err = (out.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    assert err <= 2 * eager_err + ATOL[dtype], f"error {err:.3g} vs eager's {eager_err:.3g}"
    grad_out = torch.randn_like(ref)
    got = _grads(out, low, grad_out.to(dtype))
    want = _grads(ref, [x, *weights, *biases], grad_out)
    eag = _grads(eager, low, grad_out.to(dtype))
    for name, a, r, e in zip(_names(3), got, want, eag, strict=True):
        err, eager_err = (a.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + ATOL[dtype], f"grad of {name}: error {err:.3g}"
