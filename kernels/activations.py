"""The activation table of the Triton kernels, indexed by ``tritskip.epilogue.ACTIVATION_CODES``.

Every helper takes and returns fp32 values. NaN propagates as in PyTorch: relu and leaky_relu
test ``u < 0`` (false for NaN) instead of taking a maximum. ``tanh`` is built from ``exp``
because Triton's language has no tanh and ``libdevice`` does not run under the interpreter.
"""

import triton
import triton.language as tl

IDENTITY: tl.constexpr = 0
RELU: tl.constexpr = 1
LEAKY_RELU: tl.constexpr = 2
GELU: tl.constexpr = 3
GELU_TANH: tl.constexpr = 4
SILU: tl.constexpr = 5
TANH: tl.constexpr = 6
SIGMOID: tl.constexpr = 7

INV_SQRT_2: tl.constexpr = 0.7071067811865476
SQRT_2_OVER_PI: tl.constexpr = 0.7978845608028654
GELU_TANH_COEFF: tl.constexpr = 0.044715


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
        u = 0.5 * u * (1.0 + tl.math.erf(u * INV_SQRT_2))
    elif ACTIVATION == GELU_TANH:
        u = 0.5 * u * (1.0 + _tanh(SQRT_2_OVER_PI * (u + GELU_TANH_COEFF * u * u * u)))
    elif ACTIVATION == SILU:
        u = u * tl.sigmoid(u)
    elif ACTIVATION == TANH:
        u = _tanh(u)
    elif ACTIVATION == SIGMOID:
        u = tl.sigmoid(u)
    return u
