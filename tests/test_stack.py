"""The fused op inside the rest of the PyTorch stack: compile, export, autocast, checkpoint, func.

Each test runs a model built on the fused Linear epilogue (``fused_linear`` calls, the blocks, an
``optimize``d model) through one PyTorch mechanism and compares values and every gradient with
the same model run eagerly. float64 where the mechanism allows it, so agreement is exact up to
summation order; under bf16 autocast the rule of DESIGN.md applies: error against float64 at
most twice eager's own, plus a small atol.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import AotEagerAndRecordGraphs, CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

from tritskip import ConcatSkip, Residual, fused_linear, fused_linear_cat
from tritskip.functional import eager_linear_cat, eager_linear_epilogue
from tritskip.graph_pass import optimize

# Eager runs here go through the custom op (its PyTorch path), the same op compiled graphs hold.
pytestmark = pytest.mark.torch_op

F64 = torch.float64


class Block(nn.Module):
    """A residual MLP block as users write it: ``x + fc2(gelu(fc1(x)))``."""

    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class MLP(nn.Module):
    def __init__(self, d=12, hidden=20, depth=2, out=3):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d, hidden) for _ in range(depth)])
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(self.blocks(x))


class Functional(nn.Module):
    """Direct calls of the functional entry points, every epilogue input in use."""

    def __init__(self, d=12):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.cat = nn.Linear(d, 5)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        y = fused_linear(x, self.fc.weight, self.fc.bias, residual=x, gamma=self.gamma,
                         alpha=0.5, activation="silu", layer_activation="tanh")  # fmt: skip
        y = fused_linear(y, self.fc.weight, self.fc.bias, residual=y, activation="relu")
        return fused_linear_cat(y, self.cat.weight, self.cat.bias, shortcut=y,
                                layer_activation="gelu", shortcut_first=True)  # fmt: skip


def _models(dtype=F64):
    """One model per front end, each with its leaves ready for gradients."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12))
    blocks = nn.Sequential(
        Residual(mlp, scale=nn.Parameter(torch.full((12,), 0.3))),
        ConcatSkip(nn.Linear(12, 4), activation="gelu"),
        Residual(nn.Linear(16, 16), activation="tanh"),
    )
    plain = MLP()
    return {
        "functional": Functional().to(dtype),
        "blocks": blocks.to(dtype),
        "optimized": optimize(plain.to(dtype), torch.randn(2, 12, dtype=dtype)),
    }


def _grads(model, x, out):
    leaves = [x, *model.parameters()]
    return torch.autograd.grad(out.square().sum(), leaves)


def _assert_same(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"{what} [{i}]: {m}")


def _uses_op(model, x):
    """Whether the model's forward reaches the fused op (not an eager fallback)."""
    out = model(x)
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "linear_epilogue" in type(fn).__name__:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("name", ["functional", "blocks", "optimized"])
def test_compile_fullgraph_matches_eager(name):
    model = _models()[name]
    x = torch.randn(2, 3, 12, dtype=F64, requires_grad=True)
    assert _uses_op(model, x)
    expected = model(x)
    expected_grads = _grads(model, x, expected)

    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    _assert_same([out], [expected], f"{name}: compiled output")
    _assert_same(_grads(model, x, out), expected_grads, f"{name}: compiled gradients")
    # The op is decomposed for the backend: it sees the matmul and the epilogue, not a call.
    forward = backend.fw_graphs[0].code
    assert "tritskip" not in forward and "addmm" in forward, forward


def test_compile_dynamic_batch_no_recompile():
    model = _models()["optimized"]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compiled(torch.randn(3, 12, dtype=F64))
    frames = counter.frame_count
    for rows in (5, 8):
        x = torch.randn(rows, 12, dtype=F64)
        _assert_same([compiled(x)], [model(x)], f"dynamic batch of {rows}")
    assert counter.frame_count == frames, "recompiled for a new batch size"


def test_compile_inductor_matches_eager():
    # One op keeps Inductor's C++ compile short; the other tests cover the model forms.
    torch.manual_seed(1)
    fc = nn.Linear(12, 12).to(F64)
    x = torch.randn(4, 12, dtype=F64, requires_grad=True)

    def step(x):
        return fused_linear(x, fc.weight, fc.bias, residual=x, gamma=0.5, activation="gelu")

    expected = step(x)
    expected_grads = _grads(fc, x, expected)
    out = torch.compile(step, fullgraph=True)(x)
    _assert_same([out], [expected], "inductor output")
    _assert_same(_grads(fc, x, out), expected_grads, "inductor gradients")


@pytest.mark.triton
def test_compile_where_the_kernels_run_eagerly():
    # Eager calls run the Triton kernels (the interpreter here); a traced call whose kernel
    # launches cannot be captured takes the PyTorch path, forward and backward.
    torch.manual_seed(2)
    fc = nn.Linear(9, 9)
    x = torch.randn(5, 9, requires_grad=True)

    def step(x):
        return fused_linear(x, fc.weight, fc.bias, residual=x, activation="gelu")

    expected = step(x)
    expected_grads = _grads(fc, x, expected)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    _assert_same([out], [expected], "compiled output")
    _assert_same(_grads(fc, x, out), expected_grads, "compiled gradients")


def _check_inplace_after_op():
    # Eager lets a Linear-plus-add output be modified in place; so must the fused op, in any
    # rank and in concat mode (its outputs must not be views of an internal buffer).
    torch.manual_seed(3)
    w = torch.randn(6, 6, requires_grad=True)
    for shape in [(4, 6), (2, 3, 6)]:
        x = torch.randn(*shape, requires_grad=True)
        results = []
        for linear, cat in [
            (fused_linear, fused_linear_cat),
            (eager_linear_epilogue, eager_linear_cat),
        ]:
            y = linear(x, w, residual=x)
            y.mul_(2)
            c = cat(x, w, shortcut=x)
            c.add_(1)
            results.append([y, c, *torch.autograd.grad((y.sum() + c.square().sum()), [x, w])])
        _assert_same(results[0], results[1], f"in-place after the op, input {shape}")


def test_inplace_on_the_output():
    _check_inplace_after_op()


@pytest.mark.triton
def test_inplace_on_the_output_of_the_kernel():
    _check_inplace_after_op()


# ---------------------------------------------------------------------------------------------
# torch.export


def test_export_optimized_model_eval():
    model = _models()["optimized"].eval()
    x = torch.randn(6, 12, dtype=F64)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    code = program.graph_module.code
    assert code.count("torch.ops.tritskip.linear_epilogue.default") == 4, code
    for rows in (6, 9):
        x = torch.randn(rows, 12, dtype=F64)
        _assert_same([program.module()(x)], [model(x)], f"exported, batch {rows}")


# ---------------------------------------------------------------------------------------------
# autocast


def _autocast_cases():
    g = torch.Generator().manual_seed(3)

    def make(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()

    x = make(5, 7, 24)
    w, b = make(24, 24, scale=24**-0.5), make(24)
    r16, gamma = make(5, 7, 24, dtype=torch.bfloat16), make(24)
    return [
        ("fp32 residual", fused_linear, eager_linear_epilogue, (x, w, b), {"residual": x}),
        ("residual, gelu, alpha", fused_linear, eager_linear_epilogue, (x, w, b),
         {"residual": x, "activation": "gelu", "alpha": -0.5}),
        ("per-channel gamma", fused_linear, eager_linear_epilogue, (x, w, b),
         {"residual": x, "gamma": gamma, "layer_activation": "silu"}),
        ("0-d gamma, bf16 residual", fused_linear, eager_linear_epilogue, (x, w, b),
         {"residual": r16, "gamma": gamma[0]}),
        ("no residual", fused_linear, eager_linear_epilogue, (x, w, b),
         {"layer_activation": "tanh"}),
        ("cat", fused_linear_cat, eager_linear_cat, (x, w, b),
         {"shortcut": x, "layer_activation": "relu"}),
    ]  # fmt: skip


def _leaves(args, kwargs):
    found = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return list({id(t): t for t in found}.values())


def _as64(t):
    return t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t


@pytest.mark.parametrize("case", _autocast_cases(), ids=lambda c: c[0])
def test_autocast_bf16_fuses_and_matches_eager_dtypes(case):
    what, fused_fn, eager_fn, args, kwargs = case
    leaves = _leaves(args, kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_fn(*args, **kwargs)
        eager = eager_fn(*args, **kwargs)
    assert "linear_epilogue" in type(fused.grad_fn).__name__, f"{what}: not fused"
    assert fused.dtype == eager.dtype and fused.shape == eager.shape and fused.is_contiguous()

    # float64 oracle: the same composition without autocast.
    leaves64 = {id(t): _as64(t) for t in leaves}
    args64 = [leaves64.get(id(a), a) for a in args]
    kwargs64 = {k: leaves64.get(id(v), v) for k, v in kwargs.items()}
    reference = eager_fn(*args64, **kwargs64)
    upstream = torch.randn(reference.shape, dtype=F64, generator=torch.Generator().manual_seed(4))

    def check(a, e, ref, name):
        assert a.dtype == e.dtype, f"{what}: {name} dtype {a.dtype}, eager {e.dtype}"
        fused_err = (a.double() - ref).abs().max().item()
        eager_err = (e.double() - ref).abs().max().item()
        assert fused_err <= 2 * eager_err + 1e-2 * ref.abs().max().item() + 1e-6, (
            f"{what}: {name} error {fused_err:.3g} vs float64, eager's {eager_err:.3g}"
        )

    check(fused, eager, reference, "output")
    grads = torch.autograd.grad(fused, leaves, upstream.to(fused.dtype))
    eager_grads = torch.autograd.grad(eager, leaves, upstream.to(eager.dtype))
    ref_grads = torch.autograd.grad(reference, list(leaves64.values()), upstream)
    for i, (a, e, ref) in enumerate(zip(grads, eager_grads, ref_grads, strict=True)):
        check(a, e, ref, f"grad {i}")


def test_autocast_compiled_model_matches_eager():
    model = _models(torch.float32)["optimized"]
    x = torch.randn(4, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _uses_op(model, x)
        expected = model(x)
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    _assert_same(_grads(model, x, out), _grads(model, x, expected), "autocast compiled grads")


# ---------------------------------------------------------------------------------------------
# activation checkpointing and torch.func


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_matches_plain_backward(use_reentrant):
    model = _models()["optimized"]
    x = torch.randn(4, 12, dtype=F64, requires_grad=True)
    expected = model(x)

    def run(x):
        for block in model.blocks:
            x = checkpoint(block, x, use_reentrant=use_reentrant)
        return model.head(x)

    def backward(out):
        # Reentrant checkpointing supports only .backward(), so both sides use it.
        leaves = [x, *model.parameters()]
        for t in leaves:
            t.grad = None
        out.square().sum().backward()
        return [t.grad for t in leaves]

    expected_grads = backward(expected)
    out = run(x)
    _assert_same([out], [expected], "checkpointed output")
    _assert_same(backward(out), expected_grads, "checkpointed gradients")


def test_functional_call_and_func_grad():
    model = _models()["optimized"]
    x = torch.randn(4, 12, dtype=F64)
    params = {k: torch.randn_like(v) * 0.2 for k, v in model.named_parameters()}

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).square().sum()

    reference = MLP().to(F64)  # the unoptimized model, loaded with the same parameters
    reference.load_state_dict(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    value = loss(leaves)
    torch.testing.assert_close(value, reference(x).square().sum())
    by_autograd = torch.autograd.grad(value, list(leaves.values()))
    by_func = torch.func.grad(loss)(params)
    _assert_same(list(by_func.values()), by_autograd, "torch.func.grad")


def test_vmap_uses_the_batching_rule():
    model = _models()["functional"]
    xs = torch.randn(3, 4, 12, dtype=F64)
    expected = torch.stack([model(x) for x in xs])
    torch._C._functorch._set_vmap_fallback_enabled(False)  # a missing rule raises
    try:
        out = torch.func.vmap(model, in_dims=1)(xs.transpose(0, 1))
        per_sample = torch.func.vmap(torch.func.grad(lambda x: model(x).sum()))(xs)
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)
    _assert_same([out], [expected], "vmap output")
    x = xs.clone().requires_grad_()
    _assert_same([per_sample], torch.autograd.grad(model(x).sum(), x), "per-sample grads")


def test_vmap_over_an_ensemble_of_parameters():
    model = _models()["functional"]
    x = torch.randn(4, 12, dtype=F64)
    names = [k for k, _ in model.named_parameters()]
    stacked = {k: torch.stack([p * (1 + 0.1 * i) for i in range(3)]) for k, p in
               model.named_parameters()}  # fmt: skip

    def one(p):
        return torch.func.functional_call(model, p, (x,))

    out = torch.func.vmap(one)(stacked)
    expected = torch.stack([one({k: stacked[k][i] for k in names}) for i in range(3)])
    _assert_same([out], [expected], "ensemble")


def test_forward_mode_jvp():
    model = _models()["functional"]
    x, tangent = torch.randn(4, 12, dtype=F64), torch.randn(4, 12, dtype=F64)
    out, jvp = torch.func.jvp(model, (x,), (tangent,))
    x1 = x.clone().requires_grad_()
    jacobian_product = torch.autograd.functional.jvp(model, x1, tangent)[1]
    _assert_same([out, jvp], [model(x), jacobian_product], "jvp")
