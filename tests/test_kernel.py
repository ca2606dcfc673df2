"""The fused op against a float64 reference, through its autograd, on both of its backends.

Each test runs on the Triton kernels (on CPU in Triton's interpreter) and on the op's PyTorch
path. The rule (DESIGN.md): the fused result's error
against float64 is at most twice eager PyTorch's error in the same dtype, plus a small atol.
bf16 dots are computed wrongly by the interpreter, so under it the kernel upcasts bf16 operands
to fp32 before ``tl.dot`` (``DOT_IN_FP32``); bf16 tests here check loads, epilogue and the
bf16 store, not the bf16 tensor-core path, which needs a GPU.
"""

import pytest
import torch

from tritskip import ACTIVATIONS, fused_linear, fused_linear_cat
from tritskip.functional import eager_linear_cat, eager_linear_epilogue
from tritskip.ops import force_backend


@pytest.fixture(autouse=True, params=["triton", "torch"])
def op_backend(request):
    """Every test runs on the Triton kernels and on the op's PyTorch path."""
    if request.param == "triton":
        from conftest import skip_without_triton

        skip_without_triton()
    with force_backend(request.param):
        yield request.param


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [(1, 1, 1), (3, 17, 33), (17, 1, 65), (65, 33, 1), (33, 65, 17)]  # (M, N, K)


def _tensors(m, n, k, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)
        return t.requires_grad_(requires_grad)

    return {
        "x": make(m, k),
        "weight": make(n, k, scale=k**-0.5),
        "bias": make(n),
        "residual": make(m, n),
        "gamma": make(n),
        "shortcut": make(m, 5),
    }


def _as64(value):
    if isinstance(value, torch.Tensor):
        return value.detach().double().requires_grad_(value.requires_grad)
    return value


def _check(fused, eager_same_dtype, reference64, what, dtype):
    fused_err = (fused.double() - reference64).abs().max().item() if fused.numel() else 0.0
    eager_err = (
        (eager_same_dtype.double() - reference64).abs().max().item() if fused.numel() else 0.0
    )
    bound = 2 * eager_err + ATOL[dtype]
    assert fused_err <= bound, (
        f"{what}: error {fused_err:.3g} vs float64 exceeds 2x eager's {eager_err:.3g} + atol"
    )


def _run_epilogue(t, dtype, **kwargs):
    args = {k: t[k] for k in ("x", "weight", "bias")}
    fused = fused_linear(**args, **kwargs)
    eager = eager_linear_epilogue(**args, **kwargs)
    kwargs64 = {k: _as64(v) for k, v in kwargs.items()}
    reference = eager_linear_epilogue(**{k: _as64(v) for k, v in args.items()}, **kwargs64)
    return fused, eager, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slot", ["activation", "layer_activation"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_each_activation(act, slot, dtype):
    t = _tensors(17, 33, 65, dtype)
    fused, eager, ref = _run_epilogue(t, dtype, residual=t["residual"], **{slot: act})
    assert fused.dtype == dtype and fused.shape == (17, 33)
    _check(fused, eager, ref, f"{act} as {slot}", dtype)


MODES = ["residual", "gamma_vector", "gamma_scalar_alpha", "no_bias", "both_activations"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_modes_and_odd_shapes(mode, shape, dtype):
    t = _tensors(*shape, dtype)
    kwargs = {"residual": t["residual"], "activation": "relu"}
    if mode == "gamma_vector":
        kwargs["gamma"] = t["gamma"]
    elif mode == "gamma_scalar_alpha":
        kwargs.update(gamma=-1.0, alpha=0.5)
    elif mode == "no_bias":
        t["bias"] = None
    elif mode == "both_activations":
        kwargs.update(layer_activation="gelu", activation="silu", gamma=t["gamma"])
    fused, eager, ref = _run_epilogue(t, dtype, **kwargs)
    _check(fused, eager, ref, f"{mode} {shape}", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shortcut_first", [False, True])
def test_concat_writes_both_slices(shortcut_first, shape, dtype):
    t = _tensors(*shape, dtype)
    kwargs = {
        "shortcut": t["shortcut"],
        "layer_activation": "relu",
        "shortcut_first": shortcut_first,
    }
    args = {k: t[k] for k in ("x", "weight", "bias")}
    fused = fused_linear_cat(**args, **kwargs)
    eager = eager_linear_cat(**args, **kwargs)
    ref = eager_linear_cat(
        **{k: _as64(v) for k, v in args.items()}, **{k: _as64(v) for k, v in kwargs.items()}
    )
    assert fused.shape == eager.shape and fused.is_contiguous()
    _check(fused, eager, ref, f"concat {shape}", dtype)
    shortcut_cols = slice(0, 5) if shortcut_first else slice(shape[1], shape[1] + 5)
    assert torch.equal(fused[:, shortcut_cols], t["shortcut"]), "shortcut slice is not a copy"


def test_unwritten_elements_would_show(monkeypatch):
    """Every output element is written: outputs are NaN-filled before the kernel runs."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    for m, n, k in SHAPES:
        t = _tensors(m, n, k, torch.float32)
        y = fused_linear(t["x"], t["weight"], t["bias"], residual=t["residual"])
        c = fused_linear_cat(t["x"], t["weight"], t["bias"], shortcut=t["shortcut"])
        assert not y.isnan().any() and not c.isnan().any(), f"unwritten output at {(m, n, k)}"


@pytest.mark.parametrize("act", ["relu", "gelu_tanh", "sigmoid"])
def test_bfloat16_upcast_dot(act):
    """bf16 loads, epilogue and store (dot upcast under the interpreter; see module docstring)."""
    dtype = torch.bfloat16
    t = _tensors(33, 17, 65, dtype)
    fused, eager, ref = _run_epilogue(t, dtype, residual=t["residual"], activation=act)
    assert fused.dtype == dtype
    _check(fused, eager, ref, f"bf16 {act}", dtype)


def test_leading_batch_dims_and_strided_inputs():
    dtype = torch.float32
    g = torch.Generator().manual_seed(1)
    x4 = torch.randn(2, 3, 5, 7, generator=g)
    w_big = torch.randn(11, 9, generator=g)
    weight = w_big[:, 1:8]  # a sliced, non-contiguous weight
    bias = torch.randn(11, generator=g)
    residual = torch.randn(11, 5, 3, 2, generator=g).permute(3, 2, 1, 0)  # transposed view
    fused = fused_linear(x4, weight, bias, residual=residual, activation="tanh")
    eager = eager_linear_epilogue(x4, weight, bias, residual=residual, activation="tanh")
    ref = eager_linear_epilogue(
        x4.double(), weight.double(), bias.double(), residual=residual.double(), activation="tanh"
    )
    assert fused.shape == (2, 3, 5, 11) and fused.is_contiguous()
    _check(fused, eager, ref, "4-D strided", dtype)
    x_t = torch.randn(7, 13, generator=g).t()  # 2-D transposed input, read through strides
    fused = fused_linear(x_t, weight, bias)
    _check(fused, torch.nn.functional.linear(x_t, weight, bias),
           torch.nn.functional.linear(x_t.double(), weight.double(), bias.double()),
           "transposed x", dtype)  # fmt: skip


def test_empty_batch():
    t = _tensors(0, 5, 3, torch.float32)
    y = fused_linear(t["x"], t["weight"], t["bias"], residual=t["residual"], activation="relu")
    assert y.shape == (0, 5)
    c = fused_linear_cat(t["x"], t["weight"], t["bias"], shortcut=t["shortcut"])
    assert c.shape == (0, 10)


GRAD_CASES = {
    "relu_residual": {"activation": "relu", "residual": True},
    "gelu_gamma_vector": {"activation": "gelu", "residual": True, "gamma": True},
    "inner_silu_outer_tanh": {"layer_activation": "silu", "activation": "tanh", "residual": True},
    "sigmoid_alpha": {"activation": "sigmoid", "residual": True, "alpha": -0.5, "scalar": 2.0},
    "leaky_no_residual": {"activation": "leaky_relu"},
    "concat_relu": {"concat": True, "layer_activation": "relu"},
    "concat_gelu_first_gamma": {"concat": True, "layer_activation": "gelu", "gamma": True,
                                "shortcut_first": True},
}  # fmt: skip


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_gradient(case, dtype):
    spec = GRAD_CASES[case]
    t = _tensors(17, 33, 9, dtype, requires_grad=True)
    names = ["x", "weight", "bias"]
    kwargs = {}
    if spec.get("layer_activation"):
        kwargs["layer_activation"] = spec["layer_activation"]
    if spec.get("gamma"):
        kwargs["gamma"], names = t["gamma"], [*names, "gamma"]
    elif "scalar" in spec:
        kwargs["gamma"] = spec["scalar"]
    if spec.get("concat"):
        kwargs["shortcut"], names = t["shortcut"], [*names, "shortcut"]
        kwargs["shortcut_first"] = spec.get("shortcut_first", False)
        fused_fn, eager_fn = fused_linear_cat, eager_linear_cat
    else:
        kwargs["activation"] = spec.get("activation")
        kwargs["alpha"] = spec.get("alpha", 1.0)
        if spec.get("residual"):
            kwargs["residual"], names = t["residual"], [*names, "residual"]
        fused_fn, eager_fn = fused_linear, eager_linear_epilogue

    def grads(fn, tensors, kw):
        out = fn(tensors["x"], tensors["weight"], tensors["bias"], **kw)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        (out.double() * weights).sum().backward()
        return [tensors[n].grad for n in names]

    def rebind(tensors):
        # The same keyword arguments, with each tensor replaced by its twin in ``tensors``.
        by_id = {id(v): k for k, v in t.items()}
        return {k: tensors[by_id[id(v)]] if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}  # fmt: skip

    fused_grads = grads(fused_fn, t, kwargs)
    t_eager = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    eager_grads = grads(eager_fn, t_eager, rebind(t_eager))
    t64 = {k: _as64(v) for k, v in t.items()}
    ref_grads = grads(eager_fn, t64, rebind(t64))
    for name, f, e, r in zip(names, fused_grads, eager_grads, ref_grads, strict=True):
        assert f is not None and f.dtype == dtype, f"{name}: missing gradient or wrong dtype"
        _check(f, e, r, f"grad of {name} ({case})", dtype)


def _grads_of(fn, leaves, kwargs_fn):
    out = fn(**kwargs_fn(leaves))
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.double() * weights).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


def _compare_grads(fused_fn, eager_fn, leaves, kwargs_fn, dtype, what):
    fused = _grads_of(fused_fn, leaves, kwargs_fn)
    twins = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    eager = _grads_of(eager_fn, twins, kwargs_fn)
    ref = _grads_of(eager_fn, {k: _as64(v) for k, v in leaves.items()}, kwargs_fn)
    for name in leaves:
        assert fused[name] is not None, f"{what}: no gradient for {name}"
        assert fused[name].dtype == leaves[name].dtype, f"{what}: grad dtype of {name}"
        _check(fused[name], eager[name], ref[name], f"{what}: grad of {name}", dtype)


@pytest.mark.parametrize("slot", ["activation", "layer_activation"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradient_of_each_activation(act, slot):
    dtype = torch.float32
    t = _tensors(17, 33, 9, dtype, requires_grad=True)
    leaves = {k: t[k] for k in ("x", "weight", "bias", "residual", "gamma")}

    def kwargs(v):
        return {"x": v["x"], "weight": v["weight"], "bias": v["bias"], "residual": v["residual"],
                "gamma": v["gamma"], slot: act}  # fmt: skip

    _compare_grads(fused_linear, eager_linear_epilogue, leaves, kwargs, dtype, f"{act} {slot}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (3, 5), (2, 3, 1)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("nk", [(1, 1), (33, 3), (3, 65)], ids=lambda s: f"n{s[0]}k{s[1]}")
def test_gradients_over_dims_and_dtypes(nk, lead, dtype):
    n, k = nk
    g = torch.Generator().manual_seed(2)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    leaves = {
        "x": make(*lead, 7, k),
        "weight": make(n, k, scale=k**-0.5),
        "bias": make(n),
        "residual": make(*lead, 7, n),
    }

    def kwargs(v):
        return {"x": v["x"], "weight": v["weight"], "bias": v["bias"], "residual": v["residual"],
                "activation": "gelu", "alpha": 0.5}  # fmt: skip

    _compare_grads(fused_linear, eager_linear_epilogue, leaves, kwargs, dtype, f"{lead} {nk}")


def test_wider_residual_promotes_like_eager():
    """An fp16 matmul merged with an fp32 residual (what autocast produces) returns fp32."""
    g = torch.Generator().manual_seed(3)
    leaves = {
        "x": torch.randn(9, 17, generator=g).half().requires_grad_(),
        "weight": (torch.randn(33, 17, generator=g) * 0.25).half().requires_grad_(),
        "bias": torch.randn(33, generator=g).half().requires_grad_(),
        "residual": torch.randn(9, 33, generator=g).requires_grad_(),
    }

    def kwargs(v):
        return {**v, "activation": "silu"}

    with torch.no_grad():
        assert fused_linear(**kwargs(leaves)).dtype == torch.float32
    _compare_grads(fused_linear, eager_linear_epilogue, leaves, kwargs, torch.float16, "fp16+fp32")
