"""DenseChain and dense_chain against the eager chain ``h = cat([act(fc(h)), h], -1)``.

float64 checks compare values and every gradient (input, each weight, each bias) with eager
float64. Lower precisions follow DESIGN.md: error against the float64 eager chain at most twice
eager's own error in that dtype, plus a small atol. Freshly allocated memory is filled with NaN
(``fill_uninitialized_memory``), so a column the chain forgets to write fails.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritskip.dense_chain import DenseChain, dense_chain, eager_dense_chain
from tritskip.graph_pass import explain, fuse_graph, optimize

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
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=ref.dtype)
    got = _grads(out, low, grad_out.to(dtype))
    want = _grads(ref, [x, *weights, *biases], grad_out)
    eag = _grads(eager, low, grad_out.to(dtype))
    for name, a, r, e in zip(_names(3), got, want, eag, strict=True):
        err, eager_err = (a.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + ATOL[dtype], f"grad of {name}: error {err:.3g}"


# --- the graph pass ------------------------------------------------------------------------------


class DenseNet(nn.Module):
    """``h = cat([act(fc(h)), h], -1)`` written out by hand; ``keep`` returns intermediates."""

    def __init__(self, widths=(4, 5, 3, 6), k0=7, act=F.relu, keep=(), functional=False):
        super().__init__()
        self.fcs = nn.ModuleList()
        for n in widths:
            self.fcs.append(nn.Linear(k0, n))
            k0 += n
        self.act, self.keep, self.functional = act, tuple(keep), functional

    def forward(self, x):
        h, kept = x, []
        for i, fc in enumerate(self.fcs):
            y = F.linear(h, fc.weight, fc.bias) if self.functional else fc(h)
            h = torch.cat([self.act(y), h], -1)
            if i in self.keep:
                kept.append(h)
        return (h, *kept) if kept else h


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _check_model(model, opt, x):
    model, opt = model.double(), opt.double()
    x = x.double().requires_grad_()
    outs = opt(x) if isinstance(opt(x), tuple) else (opt(x),)
    refs = model(x) if isinstance(model(x), tuple) else (model(x),)
    for a, b in zip(outs, refs, strict=True):
        assert a.shape == b.shape and a.is_contiguous()
        _assert_close(a, b, "output")
    grad_outs = [torch.randn_like(r) for r in refs]
    params = [x, *model.parameters()]
    got = torch.autograd.grad(outs, params, grad_outs)
    want = torch.autograd.grad(refs, params, grad_outs)
    for a, b in zip(got, want, strict=True):
        _assert_close(a, b, "gradient")
    return outs


@pytest.mark.parametrize("functional", [False, True], ids=["module", "F.linear"])
def test_optimize_turns_a_chain_into_one_call(functional):
    model = DenseNet(functional=functional)
    opt, report = optimize(model, return_report=True)
    calls = _calls(opt, dense_chain)
    assert len(calls) == 1 and len(calls[0].args[1]) == 4
    assert not _calls(opt, torch.cat)
    assert list(opt.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(opt.parameters(), model.parameters(), strict=True))
    assert [s.module for s in report.fused] == [f"fcs.{i}" for i in range(4)] or functional
    assert all("4-layer dense chain" in s.note for s in report.fused)
    _check_model(model, opt, torch.randn(2, 3, 7))


def test_optimize_is_idempotent_and_reports_existing_chains():
    opt = optimize(DenseNet())
    again, report = optimize(opt, return_report=True)
    assert len(_calls(again, dense_chain)) == 1
    assert len(report.sites) == 4 and all(s.already_fused for s in report.sites)
    wrapped = nn.Sequential(DenseChain(7, 3, 2, "relu"))
    report = explain(wrapped)
    assert [s.module for s in report.sites] == ["0.layers.0", "0.layers.1"]
    assert all(s.already_fused for s in report.sites)


@pytest.mark.parametrize(
    "keep, chains",
    [((1,), [2, 2]), ((0,), [3]), ((2,), [3]), ((0, 2), [2])],
    ids=["middle", "first", "third", "two"],
)
def test_escaping_intermediates_end_the_chain(keep, chains):
    model = DenseNet(keep=keep)
    opt, report = optimize(model, return_report=True)
    assert [len(n.args[1]) for n in _calls(opt, dense_chain)] == chains
    # every layer is still fused: outside a chain, a lone step becomes fused_linear_cat
    assert len(report.fused) == 4 and not report.left
    outs = _check_model(model, opt, torch.randn(5, 7))
    kept = outs[1].detach().clone()
    outs[0].detach().add_(1)  # the final buffer does not alias the returned intermediate
    assert torch.equal(outs[1], kept)


def test_mixed_activations_split_chains():
    class Mixed(DenseNet):
        def forward(self, x):
            h = x
            for i, fc in enumerate(self.fcs):
                h = torch.cat([(torch.tanh if i == 2 else F.relu)(fc(h)), h], -1)
            return h

    model = Mixed()
    opt = optimize(model)
    assert [len(n.args[1]) for n in _calls(opt, dense_chain)] == [2]  # layers 0-1; 3 lone
    _check_model(model, opt, torch.randn(4, 7))


def test_in_place_op_inside_the_chain_blocks_it():
    class Mutating(DenseNet):
        def forward(self, x):
            h = x
            for i, fc in enumerate(self.fcs):
                h = torch.cat([F.relu(fc(h)), h], -1)
                if i == 1:
                    x.mul_(2)  # x is read again by nothing, but it is the chain's input
            return h

    opt = optimize(Mutating())
    assert not _calls(opt, dense_chain)


def test_no_chain_for_shortcut_first_or_extra_users():
    class OldestFirst(DenseNet):
        def forward(self, x):
            h = x
            for fc in self.fcs:
                h = torch.cat([h, F.relu(fc(h))], -1)
            return h

    class Reused(DenseNet):
        def forward(self, x):
            h = x
            for fc in self.fcs:
                y = F.relu(fc(h))
                h = torch.cat([y, h], -1) + 0 * y.sum()
            return h

    for cls in (OldestFirst, Reused):
        model = cls()
        opt = optimize(model)
        assert not _calls(opt, dense_chain), cls.__name__
        _check_model(model, opt, torch.randn(3, 7))


def test_optimize_with_example_inputs_and_positive_cat_dim():
    class Dim1(DenseNet):
        def forward(self, x):
            h = x
            for fc in self.fcs:
                h = torch.cat([F.gelu(fc(h)), h], 1)
            return h

    model = Dim1()
    assert not _calls(optimize(model), dense_chain)  # rank unknown without shapes
    opt = optimize(model, torch.randn(3, 7))
    assert len(_calls(opt, dense_chain)) == 1
    _check_model(model, opt, torch.randn(3, 7))


def test_dynamo_backend_fuses_chains(monkeypatch):
    import tritskip.graph_pass as graph_pass

    rewritten = []

    def recording_fuse_graph(gm, **kwargs):
        sites = fuse_graph(gm, **kwargs)
        rewritten.append([len(n.args[1]) for n in _calls(gm, dense_chain)])
        return sites

    monkeypatch.setattr(graph_pass, "fuse_graph", recording_fuse_graph)
    torch._dynamo.reset()
    model = DenseNet().double()
    compiled = torch.compile(model, backend=graph_pass.dynamo_backend)
    x = torch.randn(3, 7, dtype=torch.float64)
    _assert_close(compiled(x), model(x), "output")
    assert rewritten == [[4]]


@pytest.mark.parametrize(
    "mutate",
    [lambda h: h.mul_(0.5), lambda h: h[..., 0].zero_(), lambda h: h.view(-1).add_(1)],
    ids=["direct", "getitem", "view"],
)
def test_in_place_change_of_the_result_shortens_the_chain(mutate):
    class Mutated(DenseNet):
        def forward(self, x):
            h = super().forward(x)
            mutate(h)
            return h

    # gelu: the step left over is fused by the single-site rule, whose relu form saves its
    # output for the backward (the same autograd rejection this rule avoids for chains)
    model = Mutated(act=F.gelu)
    opt = optimize(model)
    assert [len(n.args[1]) for n in _calls(opt, dense_chain)] == [3]
    _check_model(model, opt, torch.randn(3, 7))
