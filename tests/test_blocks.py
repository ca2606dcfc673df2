"""Blocks against the eager PyTorch a user would write by hand, in float64.

Each reference is a plain function of the block's own submodules and parameters, so outputs and
the gradients of the input and of every named parameter can be compared one to one. Both sides
compute in float64 and differ only in the order of roundings, so agreement is asked to 1e-12.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritskip import blocks
from tritskip.blocks import (
    ConcatSkip,
    Parallel,
    Residual,
    SkipConnection,
    layer_scale,
    residual_stack,
)
from tritskip.epilogue import Activation
from tritskip.ops import uses_triton

TOL = {"rtol": 1e-12, "atol": 1e-12}
WIDTHS = (1, 3, 17)
LEADS = ((5,), (2, 3))  # 2-D and 3-D inputs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls into the fused functional entry points made by the blocks."""
    calls = {"fused_linear": 0, "fused_linear_cat": 0}

    def counting(name):
        original = getattr(blocks, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(blocks, name, counting(name))
    return calls


def d(module: nn.Module) -> nn.Module:
    return module.double()


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def assert_matches(block: nn.Module, reference, *inputs: torch.Tensor) -> torch.Tensor:
    """``block`` and ``reference`` agree in output and in every gradient; returns the output."""
    inputs = tuple(x.detach().requires_grad_() for x in inputs)
    named = list(block.named_parameters())
    names, params = [n for n, _ in named], [p for _, p in named]
    out, ref = block(*inputs), reference(*inputs)
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.shape, ref.shape)
    torch.testing.assert_close(out, ref, **TOL, msg=lambda m: f"output differs: {m}")
    grad = torch.randn_like(ref)
    wrt = (*inputs, *params)
    got = torch.autograd.grad(out, wrt, grad, allow_unused=True)
    want = torch.autograd.grad(ref, wrt, grad, allow_unused=True)
    labels = [f"input {i}" for i in range(len(inputs))] + list(names)
    for label, g, w in zip(labels, got, want, strict=True):
        assert (g is None) == (w is None), f"gradient of {label}: one side is missing"
        if g is not None:
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, label=label: f"{label}: {m}")
    return out


# --- SkipConnection ----------------------------------------------------------------------------


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("lead", LEADS)
def test_skip_add_linear(width, lead, fused_calls):
    block = d(SkipConnection(nn.Linear(width, width), "add"))
    assert_matches(block, lambda x: block.layer(x) + x, rand(*lead, width))
    assert fused_calls["fused_linear"] == 1


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("lead", LEADS)
def test_skip_cat_linear(width, lead, fused_calls):
    block = d(SkipConnection(nn.Linear(width, 4), "cat"))
    out = assert_matches(block, lambda x: torch.cat([block.layer(x), x], -1), rand(*lead, width))
    assert out.shape == (*lead, 4 + width)
    assert fused_calls["fused_linear_cat"] == 1


def test_skip_over_sequential_runs_prefix_eagerly(fused_calls):
    block = d(SkipConnection(nn.Sequential(nn.Linear(3, 17), nn.ReLU(), nn.Linear(17, 3)), "add"))
    fc1, fc2 = block.layer[0], block.layer[2]
    assert_matches(block, lambda x: fc2(torch.relu(fc1(x))) + x, rand(2, 5, 3))
    assert fused_calls["fused_linear"] == 1


def test_skip_sequential_with_trailing_activation(fused_calls):
    block = d(SkipConnection(nn.Sequential(nn.Linear(3, 5), nn.GELU(approximate="tanh")), "cat"))
    fc = block.layer[0]
    reference = lambda x: torch.cat([F.gelu(fc(x), approximate="tanh"), x], -1)  # noqa: E731
    assert_matches(block, reference, rand(7, 3))
    assert fused_calls["fused_linear_cat"] == 1


def test_skip_subtraction_is_fused(fused_calls):
    block = d(SkipConnection(nn.Linear(3, 3), operator.sub))
    assert_matches(block, lambda x: block.layer(x) - x, rand(4, 3))
    assert fused_calls["fused_linear"] == 1


def test_skip_callable_connection():
    block = d(SkipConnection(nn.Linear(3, 3), torch.mul))
    assert_matches(block, lambda x: block.layer(x) * x, rand(4, 3))


def test_skip_other_layer_runs_eagerly(fused_calls):
    block = d(SkipConnection(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), "add"))
    assert_matches(block, lambda x: block.layer(x) + x, rand(4, 3))
    assert fused_calls == {"fused_linear": 0, "fused_linear_cat": 0}


def test_bilinear_connection_trains():
    block = d(SkipConnection(nn.Linear(3, 5), nn.Bilinear(5, 3, 2)))
    names = [n for n, _ in block.named_parameters()]
    assert names == ["layer.weight", "layer.bias", "connection.weight", "connection.bias"]
    x = rand(6, 3)
    assert_matches(block, lambda x: block.connection(block.layer(x), x), x)

    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    before = block.connection.weight.detach().clone()
    block(x).square().sum().backward()
    grad = block.connection.weight.grad
    assert grad is not None and grad.abs().max() > 1e-3, "Bilinear weight got no gradient"
    opt.step()
    assert not torch.equal(block.connection.weight.detach(), before)


# --- Residual ----------------------------------------------------------------------------------


ACTIVATIONS = {
    "none": (None, lambda v: v),
    "relu-name": ("relu", torch.relu),
    "leaky-object": (Activation("leaky_relu", 0.2), lambda v: F.leaky_relu(v, 0.2)),
    "leaky-module": (nn.LeakyReLU(0.2), lambda v: F.leaky_relu(v, 0.2)),
    "gelu-tanh-module": (nn.GELU(approximate="tanh"), lambda v: F.gelu(v, approximate="tanh")),
    "silu-function": (F.silu, F.silu),
    "tanh-module": (nn.Tanh(), torch.tanh),
    "softplus-unknown": (nn.Softplus(), F.softplus),
    "lambda-unknown": (lambda v: v * torch.sigmoid(2 * v), lambda v: v * torch.sigmoid(2 * v)),
}


@pytest.mark.parametrize("activation", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
@pytest.mark.parametrize("lead", LEADS)
def test_residual_activation(activation, lead, fused_calls):
    spec, act = activation
    block = d(Residual(nn.Linear(17, 17), activation=spec))
    assert_matches(block, lambda x: act(block.layer(x) + x), rand(*lead, 17))
    assert fused_calls["fused_linear"] == 1


SCALES = {
    "float": lambda n: 0.5,
    "learnable-vector": lambda n: layer_scale(n, 0.3),
    "learnable-scalar": lambda n: nn.Parameter(torch.tensor(0.7)),
    "fixed-vector": lambda n: torch.linspace(-1.0, 1.0, n),
}


@pytest.mark.parametrize("scale", SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize("width", WIDTHS)
def test_residual_scale(scale, width, fused_calls):
    block = d(Residual(nn.Linear(width, width), activation="relu", scale=scale(width)))
    assert_matches(block, lambda x: torch.relu(block.layer(x) * block.scale + x), rand(2, 3, width))
    assert fused_calls["fused_linear"] == 1


def test_layer_scale_is_trained():
    block = Residual(nn.Linear(3, 3), scale=layer_scale(3, 1e-5))
    assert [n for n, _ in block.named_parameters()] == ["scale", "layer.weight", "layer.bias"]
    assert torch.equal(block.scale.detach(), torch.full((3,), 1e-5))
    block = d(block)
    block(rand(4, 3)).sum().backward()
    assert block.scale.grad is not None and block.scale.grad.abs().min() > 0


def test_fixed_scale_is_a_buffer():
    block = Residual(nn.Linear(3, 3), scale=torch.full((3,), 0.25))
    assert "scale" in dict(block.named_buffers())
    assert "scale" not in dict(block.named_parameters())
    assert "scale" in block.state_dict()


@pytest.mark.parametrize("d_in,d_out", [(3, 17), (17, 1), (1, 3)])
def test_residual_projection_shortcut(d_in, d_out, fused_calls):
    block = d(Residual(nn.Linear(d_in, d_out), activation="relu"))
    assert isinstance(block.shortcut, nn.Linear)
    assert (block.shortcut.in_features, block.shortcut.out_features) == (d_in, d_out)
    assert block.shortcut.bias is None
    reference = lambda x: torch.relu(block.layer(x) + x @ block.shortcut.weight.T)  # noqa: E731
    assert_matches(block, reference, rand(2, 3, d_in))
    assert fused_calls["fused_linear"] == 1


def test_residual_projection_for_sequential():
    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 5))
    block = Residual(mlp)
    assert (block.shortcut.in_features, block.shortcut.out_features) == (3, 5)


def test_residual_custom_shortcut():
    block = d(Residual(nn.Linear(4, 3), shortcut=nn.Sequential(nn.Linear(4, 3), nn.Tanh())))
    assert_matches(block, lambda x: block.layer(x) + block.shortcut(x), rand(5, 4))
    sliced = d(Residual(nn.Linear(4, 3), shortcut=lambda x: x[..., :3]))
    assert_matches(sliced, lambda x: sliced.layer(x) + x[..., :3], rand(5, 4))


def test_residual_over_two_layers(fused_calls):
    """Skipping over k layers is a Residual around a Sequential, fused at its last Linear."""
    fc1, fc2 = nn.Linear(17, 3), nn.Linear(3, 17)
    block = d(Residual(nn.Sequential(fc1, nn.ReLU(), fc2), activation="relu", scale=0.5))
    reference = lambda x: torch.relu(fc2(torch.relu(fc1(x))) * 0.5 + x)  # noqa: E731
    assert_matches(block, reference, rand(2, 3, 17))
    assert fused_calls["fused_linear"] == 1


def test_residual_sequential_with_trailing_activation(fused_calls):
    mlp = nn.Sequential(nn.Linear(3, 3), nn.SiLU())
    block = d(Residual(mlp, activation=nn.Tanh(), scale=layer_scale(3, 0.5)))
    reference = lambda x: torch.tanh(F.silu(mlp[0](x)) * block.scale + x)  # noqa: E731
    assert_matches(block, reference, rand(4, 3))
    assert fused_calls["fused_linear"] == 1


@pytest.mark.parametrize(
    "activation", ["relu", F.relu, nn.ReLU()], ids=["name", "function", "module"]
)
def test_residual_stack_matches_hand_written(activation):
    layers = [nn.Linear(3, 3) for _ in range(4)]
    stack = d(residual_stack(layers, span=2, activation=activation))
    assert len(stack) == 2 and all(isinstance(b, Residual) for b in stack)
    assert [type(m) for m in stack[0].layer] == [nn.Linear, nn.ReLU, nn.Linear]

    def reference(x):
        h = torch.relu(layers[1](torch.relu(layers[0](x))) + x)
        return torch.relu(layers[3](torch.relu(layers[2](h))) + h)

    assert_matches(stack, reference, rand(2, 5, 3))


def test_residual_stack_span_one_and_module_activation():
    layers = [nn.Linear(3, 3) for _ in range(3)]
    stack = d(residual_stack(layers, span=1, activation=nn.LeakyReLU(0.1)))
    assert [type(b.layer) for b in stack] == [nn.Linear] * 3

    def reference(x):
        for layer in layers:
            x = F.leaky_relu(layer(x) + x, 0.1)
        return x

    assert_matches(stack, reference, rand(4, 3))


def test_forward_hook_is_honoured(fused_calls):
    block = d(Residual(nn.Linear(3, 3), activation="relu"))
    block.layer.register_forward_hook(lambda mod, inp, out: out * 2)
    weight, bias = block.layer.weight, block.layer.bias
    assert_matches(block, lambda x: torch.relu(2 * F.linear(x, weight, bias) + x), rand(4, 3))
    assert fused_calls["fused_linear"] == 0


def test_backward_hook_fires(fused_calls):
    block = d(Residual(nn.Linear(3, 3), activation="relu"))
    seen = []
    block.layer.register_full_backward_hook(lambda mod, g_in, g_out: seen.append(g_out[0].shape))
    assert_matches(block, lambda x: torch.relu(block.layer(x) + x), rand(4, 3))
    assert seen == [(4, 3)] * 2  # once for the block, once for the reference
    assert fused_calls["fused_linear"] == 0


def test_one_dimensional_input():
    block = d(Residual(nn.Linear(3, 3), activation="relu"))
    assert_matches(block, lambda x: torch.relu(block.layer(x) + x), rand(3))


# --- ConcatSkip --------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
@pytest.mark.parametrize("shortcut_first", [False, True])
def test_concat_skip(activation, shortcut_first):
    spec, act = activation
    block = d(ConcatSkip(nn.Linear(3, 17), activation=spec, shortcut_first=shortcut_first))

    def reference(x):
        y = act(block.layer(x))
        return torch.cat([x, y] if shortcut_first else [y, x], -1)

    out = assert_matches(block, reference, rand(2, 5, 3))
    assert out.shape == (2, 5, 20)


def test_concat_skip_fuses_known_activation(fused_calls):
    block = d(ConcatSkip(nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)), "relu"))
    fc1, fc2 = block.layer[0], block.layer[2]
    reference = lambda x: torch.cat([torch.relu(fc2(torch.relu(fc1(x)))), x], -1)  # noqa: E731
    assert_matches(block, reference, rand(6, 1))
    assert fused_calls["fused_linear_cat"] == 1


def test_concat_skip_stack_grows_width():
    net = d(nn.Sequential(*(ConcatSkip(nn.Linear(3 + 2 * i, 2), "relu") for i in range(3))))

    def reference(x):
        for block in net:
            x = torch.cat([torch.relu(block.layer(x)), x], -1)
        return x

    out = assert_matches(net, reference, rand(4, 3))
    assert out.shape == (4, 9)


# --- Parallel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", LEADS)
def test_parallel_shared_input(lead, fused_calls):
    a, b, c = nn.Linear(3, 17), nn.Sequential(nn.Linear(3, 17), nn.Tanh()), nn.Linear(3, 17)
    block = d(Parallel("add", a, b, c))
    assert_matches(block, lambda x: a(x) + b(x) + c(x), rand(*lead, 3))
    cat = d(Parallel("cat", a, b, c))
    out = assert_matches(cat, lambda x: torch.cat([a(x), b(x), c(x)], -1), rand(*lead, 3))
    assert out.shape == (*lead, 51)
    assert fused_calls == {"fused_linear": 1, "fused_linear_cat": 1}


def test_parallel_one_input_per_layer():
    a, b = nn.Linear(3, 5), nn.Sequential(nn.Linear(1, 5), nn.ReLU())
    block = d(Parallel("add", a, b))
    assert_matches(block, lambda x, y: a(x) + b(y), rand(4, 3), rand(4, 1))
    x, y = rand(4, 3), rand(4, 1)
    torch.testing.assert_close(block((x, y)), a(x) + b(y), **TOL)


def test_parallel_bilinear_and_callable():
    a, b = nn.Linear(3, 5), nn.Linear(3, 4)
    block = d(Parallel(nn.Bilinear(5, 4, 2), a, b))
    assert [n for n, _ in block.named_parameters()] == [
        "connection.weight", "connection.bias", "layers.0.weight", "layers.0.bias",
        "layers.1.weight", "layers.1.bias",
    ]  # fmt: skip
    assert_matches(block, lambda x: block.connection(a(x), b(x)), rand(6, 3))
    mul = d(Parallel(torch.mul, a, nn.Linear(3, 5)))
    assert_matches(mul, lambda x: a(x) * mul.layers[1](x), rand(6, 3))


def test_parallel_count_mismatch():
    block = Parallel("add", nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="got 2 inputs for 3 layers"):
        block(torch.randn(2, 3), torch.randn(2, 3))


# --- repr, state_dict, tracing -----------------------------------------------------------------


def test_repr():
    block = Residual(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "relu", scale=0.5)
    assert repr(block) == (
        "Residual(\n"
        "  activation=relu, scale=0.5\n"
        "  (layer): Sequential(\n"
        "    (0): Linear(in_features=4, out_features=4, bias=True)\n"
        "    (1): ReLU()\n"
        "    (2): Linear(in_features=4, out_features=2, bias=True)\n"
        "  )\n"
        "  (shortcut): Linear(in_features=4, out_features=2, bias=False)\n"
        ")"
    )
    assert repr(SkipConnection(nn.Linear(2, 2), "cat")) == (
        "SkipConnection(\n"
        "  connection=cat\n"
        "  (layer): Linear(in_features=2, out_features=2, bias=True)\n"
        ")"
    )
    assert repr(ConcatSkip(nn.Linear(2, 3), Activation("leaky_relu", 0.2))) == (
        "ConcatSkip(\n"
        "  activation=leaky_relu(0.2)\n"
        "  (layer): Linear(in_features=2, out_features=3, bias=True)\n"
        ")"
    )
    assert repr(Parallel(torch.mul, nn.Identity())) == (
        "Parallel(\n  connection=mul\n  (layers): ModuleList(\n    (0): Identity()\n  )\n)"
    )
    ls = repr(Residual(nn.Linear(3, 3), nn.GELU(), scale=layer_scale(3)))
    assert "scale=<learnable (3,)>" in ls and "(activation): GELU(approximate='none')" in ls


def test_state_dict_keys():
    net = nn.Sequential(
        Residual(nn.Linear(3, 5), scale=layer_scale(5)),
        SkipConnection(nn.Linear(5, 2), nn.Bilinear(2, 5, 4)),
        ConcatSkip(nn.Linear(4, 4), "relu"),
    )
    assert list(net.state_dict()) == [
        "0.scale", "0.layer.weight", "0.layer.bias", "0.shortcut.weight",
        "1.layer.weight", "1.layer.bias", "1.connection.weight", "1.connection.bias",
        "2.layer.weight", "2.layer.bias",
    ]  # fmt: skip
    copy = nn.Sequential(
        Residual(nn.Linear(3, 5), scale=layer_scale(5)),
        SkipConnection(nn.Linear(5, 2), nn.Bilinear(2, 5, 4)),
        ConcatSkip(nn.Linear(4, 4), "relu"),
    )
    copy.load_state_dict(net.state_dict())
    x = torch.randn(2, 3)
    torch.testing.assert_close(copy(x), net(x), rtol=0, atol=0)


def test_symbolic_trace_keeps_the_fused_call():
    net = d(nn.Sequential(Residual(nn.Linear(3, 3), "relu"), ConcatSkip(nn.Linear(3, 2), "tanh")))
    traced = torch.fx.symbolic_trace(net)
    targets = {n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"}
    assert targets == {"fused_linear", "fused_linear_cat"}
    x = rand(4, 3)
    torch.testing.assert_close(traced(x), net(x), **TOL)


def test_graph_pass_counts_blocks_as_fused():
    from tritskip.graph_pass import optimize

    net = d(
        nn.Sequential(Residual(nn.Linear(3, 3), nn.LeakyReLU(0.2)), ConcatSkip(nn.Linear(3, 2)))
    )
    optimized, report = optimize(net, rand(4, 3), return_report=True)
    assert [s.already_fused for s in report.sites] == [True, True], str(report)
    x = rand(4, 3)
    torch.testing.assert_close(optimized(x), net(x), **TOL)


# --- argument checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,error,message",
    [
        (lambda: SkipConnection(nn.Linear(2, 2), "mul"), ValueError, "unknown connection 'mul'"),
        (lambda: SkipConnection(nn.Linear(2, 2), 3), TypeError, "got int"),
        (lambda: SkipConnection(lambda x: x, "add"), TypeError, "layer must be an nn.Module"),
        (lambda: SkipConnection(nn.Linear(4, 2), "add"), ValueError, "maps 4 features to 2"),
        (lambda: Residual(nn.Linear(2, 2), "swish"), ValueError, "unknown activation 'swish'"),
        (lambda: Residual(nn.Linear(2, 2), 1.5), TypeError, "got float"),
        (lambda: Residual(nn.Linear(2, 2), shortcut=3), TypeError, "shortcut must be"),
        (
            lambda: Residual(nn.Linear(4, 2), shortcut=nn.Identity()),
            ValueError,
            "maps 4 features to 2",
        ),
        (lambda: Residual(nn.Linear(3, 3), scale=torch.ones(2)), ValueError, r"shape \(3,\)"),
        (lambda: Residual(nn.Linear(3, 3), scale=torch.ones(3, 3)), ValueError, r"\(3, 3\)"),
        (
            lambda: Residual(nn.Linear(3, 3), scale=torch.ones(3, dtype=torch.long)),
            TypeError,
            "int64",
        ),
        (lambda: Residual(nn.Linear(3, 3), scale="learnable"), TypeError, "got str"),
        (lambda: ConcatSkip(nn.Linear(2, 2), activation=object()), TypeError, "got object"),
        (lambda: Parallel("add"), ValueError, "at least one layer"),
        (lambda: Parallel("add", nn.Linear(2, 2), 5), TypeError, r"layer 1"),
        (
            lambda: residual_stack([nn.Linear(2, 2)] * 3, span=2),
            ValueError,
            "3 layers into groups of span=2",
        ),
        (lambda: residual_stack([nn.Linear(2, 2)], span=0), ValueError, "positive int"),
        (lambda: residual_stack([], span=1), ValueError, "at least one layer"),
        (lambda: residual_stack([nn.Linear(2, 2)], 1, lambda v: v), TypeError, "function"),
        (lambda: layer_scale(0), ValueError, "positive int"),
    ],
)
def test_argument_errors(build, error, message):
    with pytest.raises(error, match=message):
        build()


# --- through the Triton kernel -----------------------------------------------------------------


def _output_and_grads(forward, module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    out = forward(module, x)
    grads = torch.autograd.grad(out, [x, *module.parameters()], torch.ones_like(out))
    return [out.detach(), *grads]


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["residual", "concat"])
def test_blocks_on_the_triton_kernel(kind):
    """fp32 through the kernel: within 2x eager fp32's own error against float64 (+1e-6)."""
    if kind == "residual":
        block = Residual(nn.Linear(17, 17), activation="gelu", scale=layer_scale(17, 0.5))

        def eager(m, x):
            return F.gelu(m.layer(x) * m.scale + x)
    else:
        block = ConcatSkip(nn.Sequential(nn.Linear(17, 3), nn.Linear(3, 5)), "silu")

        def eager(m, x):
            return torch.cat([F.silu(m.layer(x)), x], -1)

    x = torch.randn(2, 3, 17)
    assert uses_triton(x)
    want = _output_and_grads(eager, copy.deepcopy(block).double(), x.double())
    got = _output_and_grads(lambda m, x: m(x), block, x)
    plain = _output_and_grads(eager, block, x)
    labels = ["output", "input grad"] + [f"{n} grad" for n, _ in block.named_parameters()]
    for label, g, w, p in zip(labels, got, want, plain, strict=True):
        fused_err = (g.double() - w).abs().max().item()
        eager_err = (p.double() - w).abs().max().item()
        assert fused_err <= 2 * eager_err + 1e-6, (
            f"{label}: {fused_err:.2e} vs eager {eager_err:.2e}"
        )
