"""Differential fuzzing of the graph pass: random skip-connection models, optimized vs original.

Each case (a :class:`fuzz_models.Spec`, printed as the model's code when it fails) is built,
optimized, and run in training and in eval mode under the same seed: the outputs and the
gradients of the input and of every parameter must match, exceptions must be of the same type,
``state_dict`` must round-trip both ways, and optimizing again must change nothing. The torch
path runs in float64 with a tight tolerance; a share runs the Triton kernels (the interpreter on
CPU) in float32, judged against a float64 oracle by the error of eager float32 (DESIGN.md).

CI runs a bounded, derandomized number of cases; ``TRITSKIP_FUZZ_EXAMPLES=2000 pytest
tests/test_fuzz.py`` runs that many on the torch path, a tenth of it on the kernels and through
the Dynamo backend, from a fresh random seed. Cases that once failed are kept below as
regression tests.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from fuzz_models import FuzzModel, Spec, Step, make_input, specs
from hypothesis import HealthCheck, given, settings
from torch import fx

from tritskip.graph_pass import dynamo_backend, optimize
from tritskip.ops import force_backend

EXAMPLES = int(os.environ.get("TRITSKIP_FUZZ_EXAMPLES", "0"))
TOL64 = {"rtol": 1e-9, "atol": 1e-10, "equal_nan": True}  # NaN where eager has NaN


def _settings(ci_examples: int, share: int = 1):
    return settings(
        max_examples=max(EXAMPLES // share, 1) if EXAMPLES else ci_examples,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def outcome(model, spec: Spec, dtype: torch.dtype, training: bool):
    """``(output, {name: gradient})`` of one forward and backward, or the exception raised."""
    base, view = make_input(spec, dtype)
    base.requires_grad_()
    model.train(training)
    for p in model.parameters():
        p.grad = None
    try:
        torch.manual_seed(1234)
        out = model(view(base))
        gen = torch.Generator().manual_seed(1)
        out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype))
    except Exception as e:
        return e
    grads = {"input": base.grad}
    grads.update((name, p.grad) for name, p in model.named_parameters())
    return out.detach(), grads


def assert_same_outcome(a, b, spec: Spec, what: str) -> None:
    if isinstance(a, Exception):
        # Eager failed (an in-place op on a value autograd saved); the fused model may raise
        # the same error or, having no such intermediate, succeed. It may not raise another.
        assert not isinstance(b, Exception) or type(b) is type(a), f"{what}: {a!r} vs {b!r}"
        return
    assert not isinstance(b, Exception), f"{what}: optimized raised {b!r}\n{spec}"
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_b, out_a, **TOL64, msg=lambda m: f"{what} output: {m}\n{spec}")
    assert grads_a.keys() == grads_b.keys(), f"{what}: parameter names differ\n{spec}"
    for name, g in grads_a.items():
        h = grads_b[name]
        assert (g is None) == (h is None), f"{what}: gradient of {name} on one side only\n{spec}"
        if g is not None:
            torch.testing.assert_close(
                h, g, **TOL64, msg=lambda m, n=name: f"{what} gradient of {n}: {m}\n{spec}"
            )


def fused_calls(module) -> int:
    return sum(
        n.op == "call_function" and n.meta.get("is_wrapped", False)
        for m in module.modules()
        if isinstance(m, fx.GraphModule)
        for n in m.graph.nodes
    )


def check(spec: Spec) -> None:
    torch.manual_seed(0)
    model = FuzzModel(spec).double()
    example = None
    if spec.example_inputs:
        base, view = make_input(spec, torch.float64)
        example = view(base)
    optimized = optimize(model, example)
    for training in (True, False):
        mode = "train" if training else "eval"
        a = outcome(model, spec, torch.float64, training)
        b = outcome(optimized, spec, torch.float64, training)
        assert_same_outcome(a, b, spec, mode)

    keys = list(model.state_dict())
    assert list(optimized.state_dict()) == keys, f"state_dict keys differ\n{spec}"
    torch.manual_seed(1)
    fresh = FuzzModel(spec).double()
    fresh.load_state_dict(optimized.state_dict(), strict=True)
    fresh_optimized = optimize(FuzzModel(spec).double())
    fresh_optimized.load_state_dict(model.state_dict(), strict=True)
    a = outcome(model, spec, torch.float64, False)
    if not isinstance(a, Exception):
        for other, what in ((fresh, "loaded into the original"), (fresh_optimized, "loaded")):
            assert_same_outcome(a, outcome(other, spec, torch.float64, False), spec, what)

    again = optimize(optimized, example)
    assert fused_calls(again) == fused_calls(optimized), f"optimizing again changed it\n{spec}"


@_settings(ci_examples=80)
@given(spec=specs())
def test_optimized_matches_original(spec):
    check(spec)


@pytest.mark.torch_op
@_settings(ci_examples=30, share=4)
@given(spec=specs())
def test_optimized_matches_original_through_the_op(spec):
    """The same, with the fused calls on the custom op's PyTorch path instead of the in-place
    composition eager CPU calls take."""
    check(spec)


@_settings(ci_examples=6, share=10)
@given(spec=specs())
def test_dynamo_backend_matches_original(spec):
    """The same models through ``torch.compile(backend="tritskip")``, which sees every module
    inlined, dropout as a call with the mode fixed, and recompiles when the mode changes."""
    torch.manual_seed(0)
    model = FuzzModel(spec).double()
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled.compile(backend=dynamo_backend)
    try:
        for training in (True, False):
            mode = "train" if training else "eval"
            a = outcome(model, spec, torch.float64, training)
            b = outcome(compiled, spec, torch.float64, training)
            assert_same_outcome(a, b, spec, f"dynamo {mode}")
    finally:
        torch._dynamo.reset()


def _error(x: torch.Tensor, oracle: torch.Tensor, finite: torch.Tensor) -> float:
    return (x.double() - oracle)[finite].abs().max().item() if finite.any() else 0.0


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy on NaN
@_settings(ci_examples=25, share=10)
@given(spec=specs(dropout=False, tiny=True))
def test_optimized_matches_original_on_the_kernels(spec):
    check_kernels(spec)


def check_kernels(spec: Spec) -> None:
    """float32 through the Triton kernels, judged by eager float32's error against float64."""
    torch.manual_seed(0)
    model = FuzzModel(spec)
    oracle_model = FuzzModel(spec).double()
    oracle_model.load_state_dict(model.state_dict())
    optimized = optimize(model)
    for training in (True, False):
        oracle = outcome(oracle_model, spec, torch.float64, training)
        eager = outcome(model, spec, torch.float32, training)
        fused = outcome(optimized, spec, torch.float32, training)
        if isinstance(eager, Exception):
            assert not isinstance(fused, Exception) or type(fused) is type(eager), spec
            continue
        assert not isinstance(fused, Exception), f"optimized raised {fused!r}\n{spec}"
        pairs = [("output", oracle[0], eager[0], fused[0])]
        pairs += [(k, oracle[1][k], eager[1][k], fused[1][k]) for k in oracle[1]]
        for name, want, e, f in pairs:
            if want is None:
                assert e is None and f is None, f"gradient of {name} on one side only\n{spec}"
                continue
            for test in (torch.isnan, torch.isposinf, torch.isneginf):
                same = torch.equal(test(f), test(e))
                assert same, f"{name}: {test.__name__} differs (training={training})\n{spec}"
            finite = torch.isfinite(want) & torch.isfinite(e) & torch.isfinite(f)
            scale = want[finite].abs().max().item() if finite.any() else 0.0
            bound = 2 * _error(e, want, finite) + 1e-5 * (1 + scale)
            err = _error(f, want, finite)
            assert err <= bound, (
                f"{name}: error {err:.3g} > {bound:.3g} (training={training})\n{spec}"
            )


# ---------------------------------------------------------------------------------------------
# Cases the fuzzer found, kept as they were printed.

REGRESSIONS: dict[str, Spec] = {
    # relu's backward multiplied by a mask: 0 instead of the gradient at a NaN pre-activation
    # (the op's PyTorch path and the Triton kernels alike).
    "relu after the add, NaN input": Spec(
        1, (1,), (Step("add", outer="nn.ReLU", bias=False),), specials=True
    ),
    # The fused leaky_relu saved its output (eager saves its input); an active dropout passes
    # an empty batch through as the same tensor, whose in-place sub_ then broke the backward.
    "leaky_relu result changed in place": Spec(
        1,
        (0,),
        (
            Step("norm"),
            Step("add", width=1, skip_view="broadcast [N]", escape=True, bias=False),
            Step(
                "add",
                width=1,
                inner="nn.LeakyReLU",
                dropout="F.dropout(p=0.3)",
                merge="y.sub_(r)",
                bias=False,
            ),
        ),
        specials=True,
    ),
}


@pytest.mark.parametrize("backend", ["composite", "torch"])
@pytest.mark.parametrize("name", REGRESSIONS)
def test_regression(name, backend):
    with force_backend(backend):
        check(REGRESSIONS[name])


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy on NaN
@pytest.mark.parametrize("name", REGRESSIONS)
def test_regression_on_the_kernels(name):
    check_kernels(REGRESSIONS[name])


def test_generator_reaches_fused_sites():
    """The strategy is not degenerate: a plain residual step fuses."""
    spec = Spec(3, (2,), (Step("add", outer="F.relu"),))
    model = FuzzModel(spec).double()
    assert fused_calls(optimize(model)) == 1, str(spec)
    check(spec)
