"""Dropout between a Linear and its merge: ``norm(dropout(dense(h)) + x)``.

The pass rewrites such a site to ``fused_linear_dropout``, which runs the fused op while the
dropout is inactive (eval mode, ``p == 0``) and the ops as written in training. These tests pin
both halves: in eval mode the fused op runs and matches the original; in training the original's
masks, rate, scaling, random-number use and gradients are kept exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import tritskip.graph_pass as graph_pass
from tritskip.graph_pass import dynamo_backend, fuse_graph, optimize

N = 8


class Sublayer(nn.Module):
    """BERT's output block: ``LayerNorm(dropout(dense(h)) + x)``."""

    def __init__(self, p: float = 0.3, inplace: bool = False) -> None:
        super().__init__()
        self.dense = nn.Linear(N, N)
        self.dropout = nn.Dropout(p, inplace=inplace)
        self.norm = nn.LayerNorm(N)

    def forward(self, h, x):
        return self.norm(self.dropout(self.dense(h)) + x)


class Plain(nn.Module):
    """``x + dropout(relu(fc(x)))`` without a norm, so dropped elements can be read off."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(F.relu(self.fc(x)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N)
        self.drop = nn.Dropout(0.4)

    def forward(self, x):
        return torch.cat([x, self.drop(self.fc(x) * 0.5)], -1)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused calls ``fused_linear_dropout`` makes (the eval-mode half)."""
    calls = []
    for name in ("fused_linear", "fused_linear_cat"):
        original = getattr(graph_pass, name)

        def counting(*args, _original=original, **kwargs):
            calls.append(_original.__name__)
            return _original(*args, **kwargs)

        monkeypatch.setattr(graph_pass, name, counting)
    return calls


def inputs(*lead: int, count: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*lead, N, generator=gen, dtype=torch.float64) for _ in range(count)]


def run(model: nn.Module, xs: list[torch.Tensor], seed: int = 7):
    """Output and every gradient (inputs, then parameters by name) under a fixed seed."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = model(*xs)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    grads = {f"input {k}": x.grad for k, x in enumerate(xs)}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return out.detach(), grads


def assert_same_run(model, optimized, xs, *, exact: bool) -> None:
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-10, "atol": 1e-10}
    out, grads = run(model, xs)
    out2, grads2 = run(optimized, xs)
    torch.testing.assert_close(out2, out, **tol, msg="outputs differ")
    assert grads.keys() == grads2.keys(), "parameter names differ"
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, **tol, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("inplace", [False, True])
def test_site_is_fused_in_eval_and_written_out_in_training(fused_calls, inplace):
    model = Sublayer(inplace=inplace).double()
    optimized, report = optimize(model, return_report=True)
    (site,) = report.sites
    assert (site.pattern, site.fused) == ("Linear → dropout → add", True), str(report)
    assert "in training it runs as written" in site.note, site.note
    xs = inputs(3, 5)

    assert_same_run(model, optimized, xs, exact=True)  # training: the same ops, bit for bit
    assert fused_calls == [], "the fused op ran in training mode"

    model.eval()
    optimized.eval()
    assert_same_run(model, optimized, xs, exact=False)
    assert fused_calls == ["fused_linear"], fused_calls

    optimized.train()
    fused_calls.clear()
    assert_same_run(model.train(), optimized, xs, exact=True)
    assert fused_calls == [], "train() after eval() did not switch the site back"


def test_rate_and_scaling_in_training():
    p = 0.3
    model = Plain(p).double()
    optimized = optimize(model)
    x = torch.randn(4000, N, dtype=torch.float64)
    torch.manual_seed(3)
    with torch.no_grad():
        y = optimized(x)
        z = F.relu(model.fc(x))
    kept = (y - x) != 0
    live = z != 0  # relu zeros look dropped either way
    rate = 1 - kept[live].double().mean().item()
    assert abs(rate - p) < 0.02, f"dropped {rate:.3f} of the elements, expected {p}"
    torch.testing.assert_close(
        (y - x)[kept], z[kept] / (1 - p), rtol=1e-12, atol=1e-12, msg="kept values not scaled"
    )


def test_reproducible_under_manual_seed():
    model = Plain(0.5).double()
    optimized = optimize(model)
    (x,) = inputs(6, count=1)
    outs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        outs.append(optimized(x))
    assert torch.equal(outs[0], outs[1]), "the same seed gave different masks"
    assert not torch.equal(outs[0], outs[2]), "different seeds gave the same mask"
    torch.manual_seed(11)
    assert torch.equal(model(x), outs[0]), "the mask differs from the original model's"


def test_concatenation_with_dropout(fused_calls):
    model = Concat().double()
    optimized, report = optimize(model, return_report=True)
    (site,) = report.sites
    assert (site.pattern, site.fused) == ("Linear → scale → dropout → cat", True), str(report)
    xs = inputs(2, 3, count=1)
    assert_same_run(model, optimized, xs, exact=True)
    assert_same_run(model.eval(), optimized.eval(), xs, exact=False)
    assert fused_calls == ["fused_linear_cat"], fused_calls


def test_zero_rate_in_training_is_fused(fused_calls):
    model = Plain(0.0).double()
    optimized = optimize(model)
    assert_same_run(model, optimized, inputs(5, count=1), exact=False)
    assert fused_calls == ["fused_linear"], fused_calls


def test_functional_dropout_fixed_by_its_arguments():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(N, N)

        def forward(self, x):
            a = x + F.dropout(self.fc(x), 0.5, training=False)
            return a + F.dropout(self.fc(a), 0.5)  # training=True: random in every mode

    model = Functional().double()
    optimized, report = optimize(model, return_report=True)
    assert [(s.pattern, s.fused, s.reason) for s in report] == [
        ("Linear → dropout → add", True, ""),
        (
            "Linear → dropout",
            False,
            "dropout between the Linear and the add is active (training=True)",
        ),
    ], str(report)
    assert_same_run(model, optimized, inputs(3, count=1), exact=False)


def test_dropout_not_moved_past_another_random_op():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(N, N)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            d = self.drop(self.fc(x))
            noise = torch.rand_like(x)
            return d + x * noise

    model = Noisy().double()
    optimized, report = optimize(model, return_report=True)
    (site,) = report.sites
    assert not site.fused, str(report)
    assert site.reason == "another op draws random numbers between the dropout and the add", site
    assert_same_run(model, optimized, inputs(4, count=1), exact=True)


def test_hooked_dropout_is_kept():
    model = Sublayer().double()
    model.dropout.register_forward_hook(lambda *args: None)
    (site,) = graph_pass.explain(model).sites
    assert not site.fused and site.reason == "dropout between the Linear and the add is kept", site


def test_optimizing_again_reports_the_dropout_site_as_fused():
    once = optimize(Sublayer().double())
    twice, report = optimize(once, return_report=True)
    (site,) = report.sites
    assert site.already_fused and site.pattern == "fused_linear_dropout → dropout → add", site
    assert twice.code == once.code, "the second pass changed the code"


class FixedMode(Sublayer):
    """``Sublayer`` as Dynamo records it: ``F.dropout`` with the captured mode as a constant."""

    def __init__(self, training: bool) -> None:
        super().__init__()
        self.fixed = training

    def forward(self, h, x):
        return self.norm(F.dropout(self.dense(h), 0.3, self.fixed) + x)


@pytest.mark.parametrize("training", [False, True])
def test_dynamo_graph_dropout_follows_the_captured_mode(training):
    model = FixedMode(training).double()
    sites = fuse_graph(fx.symbolic_trace(model))
    (site,) = sites
    assert site.fused is not training, sites
    if training:
        assert site.reason.endswith("is active (training=True)"), site.reason

    torch._dynamo.reset()
    model = Sublayer().double().train(training)
    compiled = copy.deepcopy(model)
    compiled.compile(backend=dynamo_backend)
    assert_same_run(model, compiled, inputs(3, 5), exact=False)
