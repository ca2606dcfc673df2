"""The activation table of the Triton kernels, indexed by ``tritskip.epilogue.ACTIVATION_CODES``.

Every helper takes and returns fp32 values. NaN propagates as in PyTorch: relu and leaky_relu
test ``u < 0`` (false for NaN) instead of taking a maximum. ``tanh`` is built from ``exp``
because Triton's language has no tanh and ``libdevice`` does not run under the interpreter.
The codes and constants are ``tl.constexpr`` objects: the compiler reads no other globals.
"""

import triton
import triton.language as tl

IDENTITY = tl.constexpr(0)
RELU = tl.constexpr(1)
LEAKY_RELU = tl.constexpr(2)
GELU = tl.constexpr(3)
GELU_TANH = tl.constexpr(4)
SILU = tl.constexpr(5)
TANH = tl.constexpr(6)
SIGMOID = tl.constexpr(7)

# Float constants are written inline below (1/sqrt(2) = 0.7071067811865476, sqrt(2/pi) =
# 0.7978845608028654, gelu's tanh coefficient 0.044715, 1/sqrt(2*pi) = 0.3989422804014327):
# the interpreter cannot multiply a tensor by a float tl.constexpr global.


@triton.jit
def _tanh(u):
    # tanh(u) = sign(u) * (1 - e^{-2|u|}) / (1 + e^{-2|u|}); never overflows.
    t = tl.exp(-2.0 * tl.abs(u))
    mag = (1.0 - t) / (1.0 + t)
    return tl.where(u < 0, -mag, mag)


@triton.jit
def apply_activation(u, ACTIVATION: tl.constexpr, negative_slope):
    """act(u) for the constexpr code ``ACTIVATION``; ``negative_slope`` is leaky_relu's."""
    if ACTIVATION == RELU:
        u = tl.where(u < 0, 0.0, u)
    elif ACTIVATION == LEAKY_RELU:
        u = tl.where(u < 0, u * negative_slope, u)
    elif ACTIVATION == GELU:
        u = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    elif ACTIVATION == GELU_TANH:
        u = 0.5 * u * (1.0 + _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))
    elif ACTIVATION == SILU:
        u = u * tl.sigmoid(u)
    elif ACTIVATION == TANH:
        u = _tanh(u)
    elif ACTIVATION == SIGMOID:
        u = tl.sigmoid(u)
    return u


@triton.jit
def activation_grad(
    grad, saved, ACTIVATION: tl.constexpr, negative_slope, FROM_OUTPUT: tl.constexpr
):
    """grad * act'(u), where ``saved`` is u, or act(u) when ``FROM_OUTPUT``.

    ``FROM_OUTPUT`` is valid for identity, relu, leaky_relu (positive slope), tanh and sigmoid,
    whose derivative is a function of their output; the caller checks that.
    """
    if ACTIVATION == RELU:
        grad = tl.where(saved <= 0, 0.0, grad)  # eager's threshold_backward: NaN passes grad
    elif ACTIVATION == LEAKY_RELU:
        grad = tl.where(saved > 0, grad, grad * negative_slope)
    elif ACTIVATION == TANH:
        t = saved if FROM_OUTPUT else _tanh(saved)
        grad = grad * (1.0 - t * t)
    elif ACTIVATION == SIGMOID:
        s = saved if FROM_OUTPUT else tl.sigmoid(saved)
        grad = grad * s * (1.0 - s)
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(saved * 0.7071067811865476))
        pdf = tl.exp(-0.5 * saved * saved) * 0.3989422804014327
        grad = grad * (cdf + saved * pdf)
    elif ACTIVATION == GELU_TANH:
        t = _tanh(0.7978845608028654 * (saved + 0.044715 * saved * saved * saved))
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * saved * saved)
        grad = grad * (0.5 * (1.0 + t) + 0.5 * saved * (1.0 - t * t) * d_inner)
    elif ACTIVATION == SILU:
        s = tl.sigmoid(saved)
        grad = grad * s * (1.0 + saved * (1.0 - s))
    return grad
