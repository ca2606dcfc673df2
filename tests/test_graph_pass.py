"""The graph pass against the unoptimized model, in float64.

Each pattern spelling is checked three ways: the report names it as expected, the optimized
graph calls the fused function, and outputs and the gradients of the input and of every
parameter equal the original model's. Each has a near miss that must not fuse. The safety
rules (ownership, in-place ops, dropout, train/eval, aliasing, state_dict, idempotence,
untraceable modules) have one test each.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from tritskip.functional import fused_linear, fused_linear_cat
from tritskip.graph_pass import dynamo_backend, explain, fuse_graph, optimize
from tritskip.report import Report

N = 6
TOL = {"rtol": 1e-10, "atol": 1e-10}
FUSED_FUNCTIONS = (fused_linear, fused_linear_cat)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Net(nn.Module):
    """A model whose forward is ``body(self, x)``, holding every part the bodies use."""

    def __init__(self, body, n: int = N) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(n, n)
        self.fc2 = nn.Linear(n, n)
        self.w = nn.Parameter(torch.randn(n, n) / n**0.5)
        self.b = nn.Parameter(torch.randn(n))
        self.scale = nn.Parameter(torch.rand(n) + 0.5)
        self.gamma = nn.Parameter(torch.tensor(0.7))
        self.wide = nn.Parameter(torch.rand(1, n))
        self.drop = nn.Dropout(0.5)
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.gelu_tanh = nn.GELU(approximate="tanh")
        self.leaky = nn.LeakyReLU(0.2)
        self.silu = nn.SiLU()
        self.tanh = nn.Tanh()
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return self.body(self, x)


def net(body) -> Net:
    return Net(body).double()


def example(*lead: int) -> torch.Tensor:
    return torch.randn(*(lead or (3, 5)), N, dtype=torch.float64)


def run(model: nn.Module, *inputs: torch.Tensor):
    """Outputs, input gradients and parameter gradients (by name) for fixed output gradients."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    for p in model.parameters():
        p.grad = None
    out = model(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    params = {
        name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
    }
    return [o.detach() for o in outs], [x.grad for x in xs], params


def assert_same(model: nn.Module, optimized: nn.Module, *inputs: torch.Tensor) -> None:
    outs, in_grads, param_grads = run(model, *inputs)
    outs2, in_grads2, param_grads2 = run(optimized, *inputs)
    for k, (a, b) in enumerate(zip(outs, outs2, strict=True)):
        torch.testing.assert_close(b, a, **TOL, msg=f"output {k} differs")
    for k, (a, b) in enumerate(zip(in_grads, in_grads2, strict=True)):
        torch.testing.assert_close(b, a, **TOL, msg=f"gradient of input {k} differs")
    assert param_grads.keys() == param_grads2.keys(), "parameter names differ"
    for name, a in param_grads.items():
        b = param_grads2[name]
        assert (a is None) == (b is None), f"gradient of {name} present on one side only"
        if a is not None:
            torch.testing.assert_close(b, a, **TOL, msg=f"gradient of {name} differs")


def fused_calls(module: nn.Module) -> int:
    return sum(
        n.op == "call_function" and n.target in FUSED_FUNCTIONS
        for m in module.modules()
        if isinstance(m, fx.GraphModule)
        for n in m.graph.nodes
    )


# --------------------------------------------------------------------------------------------
# Pattern spellings


def _iadd(m, x):
    h = m.fc(x)
    h += x
    return h


def _gelu_written_out(m, x):
    h = m.fc(x)
    return x + 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def _silu_written_out(m, x):
    h = m.fc(x) + x
    return h * torch.sigmoid(h)


FUSED = {
    "x + fc(x)": (lambda m, x: x + m.fc(x), "Linear → add"),
    "fc(x) + x": (lambda m, x: m.fc(x) + x, "Linear → add"),
    "torch.add alpha on the Linear": (
        lambda m, x: torch.add(x, m.fc(x), alpha=0.5),
        "Linear → add",
    ),
    "torch.add alpha on the residual": (
        lambda m, x: torch.add(m.fc(x), x, alpha=2),
        "Linear → add",
    ),
    ".add": (lambda m, x: m.fc(x).add(x), "Linear → add"),
    "+=": (_iadd, "Linear → add"),
    "x - fc(x)": (lambda m, x: x - m.fc(x), "Linear → sub"),
    "fc(x) - x": (lambda m, x: m.fc(x) - x, "Linear → sub"),
    "torch.sub alpha": (lambda m, x: torch.sub(x, m.fc(x), alpha=2), "Linear → sub"),
    ".sub_ on the Linear output": (lambda m, x: m.fc(x).sub_(x), "Linear → sub"),
    "F.linear": (lambda m, x: F.linear(x, m.w, m.b) + x, "F.linear → add"),
    "F.linear without bias": (lambda m, x: x + F.linear(x, m.w), "F.linear → add"),
    "F.relu": (lambda m, x: F.relu(m.fc(x) + x), "Linear → add → relu"),
    "torch.relu": (lambda m, x: torch.relu(x + m.fc(x)), "Linear → add → relu"),
    ".relu()": (lambda m, x: (m.fc(x) + x).relu(), "Linear → add → relu"),
    ".relu_()": (lambda m, x: (m.fc(x) + x).relu_(), "Linear → add → relu"),
    "F.relu inplace": (lambda m, x: F.relu(m.fc(x) + x, inplace=True), "Linear → add → relu"),
    "nn.ReLU inplace": (lambda m, x: m.relu_inplace(m.fc(x) + x), "Linear → add → relu"),
    "nn.GELU tanh": (lambda m, x: m.gelu_tanh(m.fc(x) + x), "Linear → add → gelu_tanh"),
    "F.gelu": (lambda m, x: F.gelu(m.fc(x) + x), "Linear → add → gelu"),
    "nn.LeakyReLU": (lambda m, x: m.leaky(m.fc(x) + x), "Linear → add → leaky_relu(0.2)"),
    "F.leaky_relu": (
        lambda m, x: F.leaky_relu(m.fc(x) + x, 0.3),
        "Linear → add → leaky_relu(0.3)",
    ),
    "nn.SiLU": (lambda m, x: m.silu(m.fc(x) + x), "Linear → add → silu"),
    "F.silu": (lambda m, x: F.silu(m.fc(x) + x), "Linear → add → silu"),
    "nn.Tanh": (lambda m, x: m.tanh(m.fc(x) + x), "Linear → add → tanh"),
    "torch.sigmoid": (lambda m, x: torch.sigmoid(m.fc(x) + x), "Linear → add → sigmoid"),
    "activation before the add": (lambda m, x: torch.tanh(m.fc(x)) + x, "Linear → tanh → add"),
    "activations before and after": (
        lambda m, x: F.relu(F.silu(m.fc(x)) + x),
        "Linear → silu → add → relu",
    ),
    "activation alone": (lambda m, x: F.gelu(m.fc(x)), "Linear → gelu"),
    "F.linear then module activation": (
        lambda m, x: m.sigmoid(F.linear(x, m.w, m.b)),
        "F.linear → sigmoid",
    ),
    "scale by a number": (lambda m, x: m.fc(x) * 0.5 + x, "Linear → scale → add"),
    "scale by a vector": (lambda m, x: x + m.fc(x) * m.scale, "Linear → scale → add"),
    "0-d scale on the left": (lambda m, x: m.gamma * m.fc(x) + x, "Linear → scale → add"),
    "subtracted vector scale": (lambda m, x: x - m.fc(x) * m.scale, "Linear → scale → sub"),
    "scale then activation": (lambda m, x: F.relu(m.fc(x) * 0.5), "Linear → scale → relu"),
    "cat": (lambda m, x: torch.cat([m.fc(x), x], dim=-1), "Linear → cat"),
    "cat shortcut first": (
        lambda m, x: torch.cat((x, F.relu(m.fc(x))), -1),
        "Linear → relu → cat",
    ),
    "gelu written out (GPT-2's gelu_new)": (_gelu_written_out, "Linear → gelu_tanh → add"),
    "silu written out after the add": (_silu_written_out, "Linear → add → silu"),
    "cat of a scaled Linear": (
        lambda m, x: torch.cat([m.fc(x) * m.scale, x], -1),
        "Linear → scale → cat",
    ),
}


@pytest.mark.parametrize("case", FUSED)
def test_pattern_is_fused(case):
    body, pattern = FUSED[case]
    model = net(body)
    optimized, report = optimize(model, return_report=True)
    assert [(s.pattern, s.fused) for s in report] == [(pattern, True)], str(report)
    assert fused_calls(optimized) == 1, f"expected one fused call:\n{optimized.code}"
    assert_same(model, optimized, example())


def _output_used_twice(m, x):
    h = m.fc(x)
    return h + x, h


def _inplace_into_residual(m, x):
    r = x * 1.0
    r += m.fc(x)
    return r


def _almost_gelu(m, x):
    h = m.fc(x)
    return 0.5 * h * (1.0 + torch.tanh(0.8 * (h + 0.044715 * h**3)))


# A near miss of each pattern: (body, pattern reported, reason) for a site that must stay.
LEFT = {
    "cat on dim 0": (
        lambda m, x: torch.cat([m.fc(x), x], 0),
        "Linear → cat",
        "cat along dim 0",
    ),
    "cat of three": (
        lambda m, x: torch.cat([m.fc(x), x, x], -1),
        "Linear → cat",
        "cat of 3 tensors",
    ),
    "Linear output used twice": (
        _output_used_twice,
        "Linear → add",
        "the Linear output has 2 users",
    ),
    "dropout before an activation": (
        lambda m, x: F.relu(m.drop(m.fc(x))),
        "Linear → dropout",
        "dropout between the Linear and the relu is kept",
    ),
    "in-place add into the residual": (
        _inplace_into_residual,
        "Linear → add",
        "the in-place add writes into the residual",
    ),
    "arithmetic that is not an activation": (
        _almost_gelu,
        "Linear → scale",
        "the Linear output has 3 users",
    ),
    "scale of shape [1, N]": (
        lambda m, x: m.fc(x) * m.wide + x,
        "Linear → scale",
        "neither a scalar nor one per channel",
    ),
}


@pytest.mark.parametrize("case", LEFT)
def test_near_miss_is_left(case):
    body, pattern, reason = LEFT[case]
    model = net(body).eval()
    optimized, report = optimize(model, return_report=True)
    assert len(report) == 1 and not report.sites[0].fused, str(report)
    site = report.sites[0]
    assert site.pattern == pattern, f"pattern {site.pattern!r}"
    assert reason in site.reason, f"reason {site.reason!r}"
    assert fused_calls(optimized) == 0, "a left site was rewritten"
    assert_same(model, optimized, example())


NOT_SITES = {
    "add of a number": lambda m, x: m.fc(x) + 1.0,
    "product of two tensors": lambda m, x: m.fc(x) * torch.sigmoid(x),
    "Linear into Linear": lambda m, x: m.fc2(m.fc(x)),
    "Linear into a reduction": lambda m, x: m.fc(x).sum(-1),
}


@pytest.mark.parametrize("case", NOT_SITES)
def test_non_pattern_is_not_a_site(case):
    model = net(NOT_SITES[case])
    optimized, report = optimize(model, return_report=True)
    assert len(report) == 0, str(report)
    assert not isinstance(optimized, fx.GraphModule), "a model without sites was rewritten"
    assert_same(model, optimized, example())


def _activation_used_twice(m, x):
    a = F.relu(m.fc(x))
    return a + x, a


def test_activation_used_twice_fuses_only_the_activation():
    model = net(_activation_used_twice)
    optimized, report = optimize(model, return_report=True)
    (site,) = report.sites
    assert (site.pattern, site.fused) == ("Linear → relu", True), str(report)
    assert site.note == "the relu output has 2 users", f"note {site.note!r}"
    assert_same(model, optimized, example())


# --------------------------------------------------------------------------------------------
# Shapes from example inputs


@pytest.mark.parametrize(
    ("dim", "lead", "fused", "reason"),
    [
        (2, (3, 5), True, ""),
        (1, (3, 5), False, "cat along dim 1, not the last dimension (2)"),
        (1, (4,), True, ""),
    ],
)
def test_cat_dim_checked_with_example_inputs(dim, lead, fused, reason):
    model = net(lambda m, x: torch.cat([m.fc(x), x], dim))
    x = example(*lead)
    optimized, report = optimize(model, x, return_report=True)
    (site,) = report.sites
    assert (site.fused, site.reason) == (fused, reason), str(report)
    assert site.shape == (*lead, 2 * N if fused else N), f"shape {site.shape}"
    assert_same(model, optimized, x)


def test_positive_cat_dim_left_without_example_inputs():
    model = net(lambda m, x: torch.cat([m.fc(x), x], 2))
    report = explain(model)
    (site,) = report.sites
    assert not site.fused, str(report)
    assert "unknown without example_inputs" in site.reason, f"reason {site.reason!r}"


def test_broadcast_residual_left_with_example_inputs_and_safe_without():
    model = net(lambda m, x: m.fc(x) + m.b)
    x = example()
    report = explain(model, x)
    (site,) = report.sites
    assert not site.fused, str(report)
    assert site.reason == "residual shape [6] differs from the Linear output [3, 5, 6]", site.reason
    optimized = optimize(model)  # without shapes it fuses and fused_linear falls back at run time
    assert fused_calls(optimized) == 1, "the site was not rewritten without example inputs"
    assert_same(model, optimized, x)


def test_example_inputs_forms_and_errors():
    model = net(lambda m, x: F.relu(m.fc(x) + x))
    x = example()
    for inputs in (x, (x,), [x], {"x": x}):
        (site,) = explain(model, inputs).sites
        assert site.shape == (3, 5, N), f"shape {site.shape} for {type(inputs).__name__}"
    with pytest.raises(ValueError, match="example_inputs do not run through the model"):
        explain(model, torch.randn(3, N + 1, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Safety rules


def test_inplace_op_between_linear_and_add_keeps_order():
    def body(m, x):
        y = x * 1.0
        h = m.fc(y)
        y.mul_(2.0)  # the Linear read y before this; a fused call at the add would not
        return h + x

    model = net(body)
    optimized, report = optimize(model, return_report=True)
    (site,) = report.sites
    assert not site.fused, str(report)
    assert site.reason == "an in-place op runs between the Linear and the add", site.reason
    x = example()
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), **TOL, msg="output differs")


def test_same_linear_called_twice():
    model = net(lambda m, x: m.fc(F.relu(m.fc(x) + x)) + x)
    optimized, report = optimize(model, return_report=True)
    assert [(s.module, s.fused) for s in report] == [("fc", True), ("fc", True)], str(report)
    assert fused_calls(optimized) == 2, optimized.code
    assert optimized.fc is not model.fc and optimized.fc.weight is model.fc.weight, "fc not shared"
    assert_same(model, optimized, example())


def test_tied_weights_stay_tied():
    model = net(lambda m, x: m.fc2(F.relu(m.fc(x) + x)) + x)
    model.fc2.weight = model.fc.weight
    optimized = optimize(model)
    assert optimized.fc2.weight is optimized.fc.weight is model.fc.weight, "tie broken"
    assert fused_calls(optimized) == 2, optimized.code
    assert_same(model, optimized, example())


class BatchNormDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(N)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(N, N)

    def forward(self, x):
        h = self.drop(self.bn(x))
        return F.relu(self.fc(h) + h)


def test_train_and_eval_still_switch():
    model = BatchNormDropout().double()
    optimized = optimize(model)
    assert fused_calls(optimized) == 1, "the site was not fused"
    x = example(8)
    optimized.eval()
    assert model.training and model.bn.training, "eval() on the result switched the input model"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), **TOL, msg="eval outputs differ")
        optimized.train()
        mean = optimized.bn.running_mean.clone()
        a, b = optimized(x), optimized(x)
    assert not torch.equal(a, b), "dropout is not active after train()"
    assert not torch.equal(optimized.bn.running_mean, mean), "batchnorm stats did not update"


class TrainingDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.inner = Net(lambda m, x: F.relu(m.fc(x) + x))

    def forward(self, x):
        return F.dropout(self.inner(self.fc(x) + x), 0.5, training=self.training)


def test_module_reading_training_flag_is_not_traced_whole():
    model = TrainingDependent().double()
    optimized, report = optimize(model, return_report=True)
    assert [(u.module, "self.training" in u.reason) for u in report.untraced] == [("", True)], str(
        report
    )
    assert [(s.module, s.fused) for s in report] == [("inner.fc", True)], str(report)
    x = example()
    with torch.no_grad():
        a, b = optimized(x), optimized(x)
        assert not torch.equal(a, b), "dropout is not active in train mode"
        optimized.eval()
        model.eval()
        torch.testing.assert_close(optimized(x), model(x), **TOL, msg="eval outputs differ")


class Buffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.unused = nn.Linear(N, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("cache", torch.ones(3), persistent=False)
        self.blocks = nn.ModuleList([Net(lambda m, x: x + m.fc(x)) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return F.silu(self.fc(x) + x)


def test_parameters_shared_and_state_dict_round_trips():
    model = Buffers().double()
    optimized = optimize(model)
    assert fused_calls(optimized) == 3, optimized.code
    original, result = model.state_dict(), optimized.state_dict()
    assert list(result) == list(original), "state_dict keys or their order differ"
    for key, value in original.items():
        assert result[key].data_ptr() == value.data_ptr(), f"{key} is not shared"
    assert dict(optimized.named_buffers()).keys() == dict(model.named_buffers()).keys(), "buffers"
    for (name, p), q in zip(model.named_parameters(), optimized.parameters(), strict=True):
        assert p is q, f"parameter {name} is not the same object"

    other = Buffers().double()
    optimized_other = optimize(other)
    optimized_other.load_state_dict(model.state_dict(), strict=True)
    other.load_state_dict(optimized.state_dict(), strict=True)
    x = example()
    assert_same(model, optimized_other, x)
    assert_same(model, other, x)


def test_input_model_is_unchanged():
    model = Buffers().double()
    modules = list(model.named_modules())
    attributes = {name: dict(vars(m)) for name, m in modules}
    x = example()
    with torch.no_grad():
        before = model(x)
    optimized = optimize(model, x)
    optimized.eval()
    assert list(model.named_modules()) == modules, "the module tree changed"
    for name, m in modules:
        assert vars(m) == attributes[name], f"attributes of {name or 'the model'} changed"
    assert all(m.training for _, m in modules), "a training flag changed"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL, msg="the input model's output changed")


class LeakyScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.scale = nn.Parameter(torch.rand(N) + 0.5)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.fc(x) * self.scale + x)


def test_optimizing_again_changes_nothing():
    model = nn.Sequential(Buffers(), LeakyScaled()).double()
    once, first = optimize(model, return_report=True)
    twice, second = optimize(once, return_report=True)
    assert len(first) == 4 and all(s.fused and not s.already_fused for s in first), str(first)
    assert [(s.module, s.already_fused) for s in second] == [(s.module, True) for s in first], str(
        second
    )
    assert twice.code == once.code, "the second pass changed the code"
    assert list(twice.state_dict()) == list(model.state_dict()), "state_dict keys changed"
    for (name, p), q in zip(model.named_parameters(), twice.parameters(), strict=True):
        assert p is q, f"parameter {name} is not the same object"
    assert_same(model, twice, example())


def test_pickle_round_trip():
    model = LeakyScaled().double()
    optimized = optimize(model)
    restored = pickle.loads(pickle.dumps(optimized))
    assert fused_calls(restored) == 1, "the restored module lost its fused call"
    x = example()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), **TOL, msg="outputs differ")


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = Net(lambda m, x: F.relu(m.fc(x) + x))
        self.neg = Net(lambda m, x: x - m.fc(x))

    def forward(self, x):
        if x.sum() > 0:
            return self.pos(x)
        return self.neg(x)


class VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Branchy()
        self.head = Net(lambda m, x: torch.cat([m.fc(x), x], -1))

    def forward(self, *args):
        return self.head(self.inner(args[0]))


def test_untraceable_model_is_optimized_per_child():
    model = VarArgs().double()
    optimized, report = optimize(model, return_report=True)
    assert [u.module for u in report.untraced] == ["", "inner"], str(report)
    assert all("control flow" in u.reason for u in report.untraced), str(report)
    assert [(s.module, s.fused) for s in report] == [
        ("inner.pos.fc", True),
        ("inner.neg.fc", True),
        ("head.fc", True),
    ], str(report)
    assert type(optimized) is VarArgs and type(optimized.inner) is Branchy, "untraced got replaced"
    assert list(optimized.state_dict()) == list(model.state_dict()), "state_dict keys differ"
    x = example()
    assert_same(model, optimized, x.abs())
    assert_same(model, optimized, -x.abs())


def test_untraceable_model_with_example_inputs_records_child_shapes():
    model = VarArgs().double()
    report = explain(model, example(4).abs())  # takes the positive branch only
    assert [s.shape for s in report] == [(4, N), None, (4, 2 * N)], str(report)


class NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.head = Net(lambda m, x: F.relu(m.fc(x) + x))

    def forward(self, x):
        with torch.no_grad():
            h = F.relu(self.fc(x) + x)
        return self.head(h) + h


def test_grad_mode_change_inside_forward_is_not_traced_whole():
    model = NoGradInside().double()
    optimized, report = optimize(model, return_report=True)
    assert [u.module for u in report.untraced] == [""], str(report)
    assert "grad mode" in report.untraced[0].reason, report.untraced[0].reason
    assert [(s.module, s.fused) for s in report] == [("head.fc", True)], str(report)
    assert_same(model, optimized, example())


def test_hooks_are_kept():
    calls = []
    model = net(lambda m, x: F.relu(m.fc(x) + x))
    model.fc.register_forward_hook(lambda *args: calls.append("fc"))
    outer = nn.Sequential(model)
    model.register_forward_pre_hook(lambda *args: calls.append("net"))
    optimized, report = optimize(outer, return_report=True)
    assert [u.module for u in report.untraced] == [""], str(report)
    assert "hooks" in report.untraced[0].reason, report.untraced[0].reason
    (site,) = report.sites
    assert (site.module, site.fused) == ("0.fc", False), str(report)
    assert site.reason == "the Linear has forward or backward hooks", site.reason
    optimized(example())
    assert calls == ["net", "fc"], f"hooks ran as {calls}"


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_linear_subclass_outside_torch_is_traced_through():
    model = net(lambda m, x: m.fc(x) + x)
    model.fc = DoubledLinear(N, N).double()
    optimized, report = optimize(model, return_report=True)
    assert [(s.pattern, s.fused) for s in report] == [("F.linear → scale → add", True)], str(report)
    assert_same(model, optimized, example())


def test_leaf_linear_subclass_with_own_forward_is_left():
    qconfig = torch.ao.quantization.get_default_qat_qconfig()
    model = net(lambda m, x: m.fc(x) + x)
    model.fc = torch.ao.nn.qat.Linear(N, N, qconfig=qconfig)
    (site,) = explain(model).sites
    assert not site.fused and site.reason == "Linear overrides Linear.forward", site


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def test_parametrized_weight_is_read_through_its_parametrization():
    model = net(lambda m, x: F.relu(m.fc(x) + x))
    nn.utils.parametrize.register_parametrization(model.fc, "weight", Symmetric())
    optimized = optimize(model)
    assert fused_calls(optimized) == 1, "the parametrized Linear was not fused"
    assert_same(model, optimized, example())


def test_inplace_op_on_a_fused_result():
    def body(m, x):
        h = m.fc(x) + x
        h.mul_(0.5)
        return h

    model = net(body)
    optimized = optimize(model)
    assert fused_calls(optimized) == 1, optimized.code
    assert_same(model, optimized, example())


# --------------------------------------------------------------------------------------------
# Report


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.proj = nn.Linear(N, N)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = F.relu(self.fc(x) + x)
        return x + F.relu(self.drop(self.proj(x)))


def test_report_contents():
    model = nn.Sequential(Block(), Block()).double()
    report = explain(model)
    assert isinstance(report, Report)
    assert len(report) == 4 and len(report.fused) == 2 and len(report.left) == 2, str(report)
    assert [s.module for s in report] == ["0.fc", "0.proj", "1.fc", "1.proj"], str(report)
    line = Block.forward.__code__.co_firstlineno
    assert [s.source.rpartition("test_graph_pass.py:")[2] for s in report] == [
        str(line + 1),
        str(line + 2),
    ] * 2, [s.source for s in report]
    assert report.sites[0].pattern == "Linear → add → relu", report.sites[0].pattern
    assert report.sites[1].reason == "dropout between the Linear and the relu is kept", str(report)
    text = str(report)
    assert text.startswith("4 sites, 2 fused, 2 left"), text
    assert "0.proj" in text and "dropout between the Linear and the relu is kept" in text, text


def test_explain_matches_optimize_and_changes_nothing():
    model = nn.Sequential(Block(), Block()).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = explain(model)
    _, optimized_report = optimize(model, return_report=True)
    assert report == optimized_report, f"{report}\n!=\n{optimized_report}"
    assert all(type(m) is not fx.GraphModule for m in model.modules()), "model was rewritten"
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed"


def test_fuse_graph_on_a_traced_module():
    model = nn.Sequential(Block(), Block()).double().eval()
    gm = fx.symbolic_trace(model)
    sites = fuse_graph(gm)
    assert [s.fused for s in sites] == [True, False, True, False], sites
    x = example()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), **TOL, msg="outputs differ")


class Flattening(nn.Module):
    """A Linear with its weight stored as [in, out], written the way GPT-2's Conv1D does."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(N, N) / N**0.5)
        self.bias = nn.Parameter(torch.randn(N))

    def forward(self, x):
        h = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.shape)
        return F.relu(h + x)


@pytest.mark.parametrize("lead", [(5,), (3, 5)])
def test_addmm_with_flattened_input_is_a_linear(lead):
    model = Flattening().double()
    x = example(*lead)
    optimized, report = optimize(model, x, return_report=True)
    (site,) = report.sites
    assert (site.pattern, site.fused, site.shape) == ("addmm → add → relu", True, (*lead, N)), site
    assert fused_calls(optimized) == 1, optimized.code
    assert "addmm" not in optimized.code and "view" not in optimized.code, optimized.code
    assert_same(model, optimized, x)
    assert explain(model).sites == [], "addmm without shapes must not be taken as a Linear"


class KwargsBlock(nn.Module):
    """Does not trace with torch.fx (``**kwargs``); Dynamo captures it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.fc2 = nn.Linear(N, N)

    def forward(self, x, **kwargs):
        h = F.relu(self.fc(x) + x) * kwargs.get("scale", 1.0)
        g = F.gelu(self.fc2(h))
        g += h
        return torch.cat([g, h], -1)


def test_dynamo_backend_fuses_captured_graphs(monkeypatch):
    import tritskip.graph_pass as graph_pass

    graphs = []

    def recording_fuse_graph(gm, **kwargs):
        sites = fuse_graph(gm, **kwargs)
        graphs.append(sites)
        return sites

    monkeypatch.setattr(graph_pass, "fuse_graph", recording_fuse_graph)
    torch._dynamo.reset()
    model = KwargsBlock().double()
    compiled = KwargsBlock().double()
    compiled.load_state_dict(model.state_dict())
    compiled.compile(backend=dynamo_backend, fullgraph=True)
    x = example()
    assert_same(model, compiled, x)
    (sites,) = graphs
    assert [(s.module, s.pattern, s.fused) for s in sites] == [
        ("fc", "F.linear → add → relu", True),
        ("fc2", "F.linear → gelu → add", True),
    ], sites


class Breaking(nn.Module):
    """Dynamo splits this model at the data-dependent branch; a site lies on each side."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.fc2 = nn.Linear(N, N)

    def forward(self, x):
        h = F.relu(self.fc(x) + x)
        if h.sum() > 0:
            h = h * 2
        return torch.tanh(self.fc2(h))


def test_explain_with_dynamo_reports_sites_across_graph_breaks():
    model = Breaking().double()
    x = example()
    report = explain(model, x, dynamo=True)
    assert [(s.module, s.pattern, s.fused) for s in report] == [
        ("fc", "F.linear → add → relu", True),
        ("fc2", "F.linear → tanh", True),
    ], str(report)
    assert len(report.graph_breaks) == 1, str(report)
    assert report.graph_breaks[0].startswith(f"{__file__}:"), report.graph_breaks
    assert "1 graph break(s)" in str(report), str(report)
    assert all(type(m) is not fx.GraphModule for m in model.modules()), "model was rewritten"
    with pytest.raises(ValueError, match="needs example_inputs"):
        explain(model, dynamo=True)


@pytest.mark.triton
def test_optimized_model_on_the_triton_kernel():
    model = nn.Sequential(Block(), Block()).eval()
    reference = copy.deepcopy(model).double()
    optimized = optimize(model)
    assert fused_calls(optimized) == 2, optimized.code
    x = torch.randn(5, N)
    with torch.no_grad():
        expected = reference(x.double())
        eager_error = (model(x).double() - expected).abs().max().item()
        error = (optimized(x).double() - expected).abs().max().item()
    assert error <= 2 * eager_error + 1e-6, f"error {error:.3g} vs eager {eager_error:.3g}"
